"""pytest-benchmark: the fused multi-task head forward + backward against plain PyTorch heads (T nn.Linear and
F.cross_entropy per task, summed with weights), on the CPU.

    python -m pytest benchmarks/test_bench_multi_task_head.py --benchmark-enable
"""
import pytest
import torch

from bench_multi_task_head import TorchHeads, case, fused_loss

SHAPES = [(32, 384, [2, 4]), (256, 768, [2, 4, 10, 3])]


@pytest.mark.parametrize("layout", ["shared", "per-task"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-d{s[1]}-T{len(s[2])}")
@pytest.mark.parametrize("impl", ["fastcls", "torch"])
def test_multi_task_head_fwd_bwd(benchmark, impl, shape, layout):
    n_rows, dim, num_labels = shape
    h, weight, bias, targets, alpha = case(layout, n_rows, dim, num_labels, torch.device("cpu"))
    if impl == "fastcls":
        leaves = (h, weight, bias)

        def step():
            return torch.autograd.grad(fused_loss(h, weight, bias, targets, num_labels, alpha), leaves)
    else:
        heads = TorchHeads(weight.detach(), bias.detach(), num_labels)
        leaves = (h, *heads.parameters())

        def step():
            return torch.autograd.grad(heads(h, targets, alpha), leaves)

    grads = benchmark(step)
    assert all(torch.isfinite(g).all() for g in grads)
