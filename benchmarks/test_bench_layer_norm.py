"""pytest-benchmark: fused dropout + add + LayerNorm forward + backward against torch eager, on the CPU.

    python -m pytest benchmarks/test_bench_layer_norm.py --benchmark-enable
"""
import pytest
import torch
import torch.nn.functional as F

from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.ops import dropout_add_layer_norm

SHAPES = [(32 * 128, 768), (8192, 1024)]


def eager(x, residual, weight, bias):
    return F.layer_norm(F.dropout(x, 0.1, training=True) + residual, (x.shape[-1],), weight, bias, 1e-12)


def fused(x, residual, weight, bias):
    return dropout_add_layer_norm(x, residual, weight, bias, 0.1, eps=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", [fused, eager], ids=["fastcls", "torch-eager"])
def test_dropout_add_layer_norm_fwd_bwd(benchmark, impl, shape, dtype):
    keep_freed_host_memory()
    generator = torch.Generator().manual_seed(0)
    x, residual, upstream = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    x.requires_grad_()
    residual.requires_grad_()
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(shape[-1], generator=generator)).to(dtype).requires_grad_()
    inputs = (x, residual, weight, bias)

    def step():
        return torch.autograd.grad(impl(*inputs), inputs, upstream)

    grads = benchmark(step)
    assert all(torch.isfinite(g).all() for g in grads)
