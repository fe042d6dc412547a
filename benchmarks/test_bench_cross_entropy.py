"""pytest-benchmark: cross-entropy and linear cross-entropy forward + backward against torch eager, on the CPU.

    python -m pytest benchmarks/test_bench_cross_entropy.py --benchmark-enable
"""
import pytest
import torch
import torch.nn.functional as F

from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.ops import cross_entropy, linear_cross_entropy

CE_SHAPES = [(32, 2), (4096, 30522)]


@pytest.mark.parametrize("shape", CE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", [cross_entropy, F.cross_entropy], ids=["fastcls", "torch-eager"])
def test_cross_entropy_fwd_bwd(benchmark, impl, shape):
    keep_freed_host_memory()
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=generator).requires_grad_()
    target = torch.randint(0, shape[1], (shape[0],), generator=generator)

    def step():
        return torch.autograd.grad(impl(logits, target), logits)[0]

    grad = benchmark(step)
    assert torch.isfinite(grad).all()


def _plain(x, w, target):
    return F.cross_entropy(F.linear(x, w), target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", [linear_cross_entropy, _plain], ids=["fastcls", "torch-plain"])
def test_linear_cross_entropy_fwd_bwd(benchmark, impl, dtype):
    keep_freed_host_memory()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 384, generator=generator).to(dtype).requires_grad_()
    w = (torch.randn(30522, 384, generator=generator) * 0.05).to(dtype).requires_grad_()
    target = torch.randint(0, 30522, (2048,), generator=generator)

    def step():
        return torch.autograd.grad(impl(x, w, target), (x, w))

    grads = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    assert all(torch.isfinite(g).all() for g in grads)
