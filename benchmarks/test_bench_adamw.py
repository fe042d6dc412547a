"""pytest-benchmark: one AdamW step over MiniLM's parameter set (22.7M, fp32, two groups) on the CPU, fastcls's
C++ FusedAdamW (with a float lr, and with a tensor lr as DeviceLRSchedule sets it) against torch.optim.AdamW
foreach and fused; and clipped steps: clip_grad_norm_ then FusedAdamW against FusedAdamW(max_grad_norm=...).

    python -m pytest benchmarks/test_bench_adamw.py --benchmark-enable
"""
import pytest
import torch
from bench_adamw import (  # pytest puts benchmarks/ on sys.path
    MAX_GRAD_NORM,
    ClipThenStep,
    groups,
    make_parameters,
    parameter_shapes,
)

from fastcls.optim import FusedAdamW

CONTENDERS = {
    "fastcls": lambda g: FusedAdamW(g, lr=1e-4),
    "fastcls-tensor-lr": lambda g: FusedAdamW(g, lr=torch.tensor(1e-4)),
    "torch-foreach": lambda g: torch.optim.AdamW(g, lr=1e-4, foreach=True),
    "torch-fused": lambda g: torch.optim.AdamW(g, lr=1e-4, fused=True),
    "clip_grad_norm_-fastcls": lambda g: ClipThenStep(FusedAdamW(g, lr=1e-4), g),
    "fastcls-max_grad_norm": lambda g: FusedAdamW(g, lr=1e-4, max_grad_norm=MAX_GRAD_NORM),
}


@pytest.fixture(scope="module")
def minilm_params():
    return make_parameters(parameter_shapes("minilm"), torch.device("cpu"), torch.float32,
                           torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(CONTENDERS))
def test_adamw_step_minilm(benchmark, minilm_params, name):
    optimizer = CONTENDERS[name](groups(minilm_params))
    optimizer.step()
    benchmark(optimizer.step)
    assert all(torch.isfinite(p).all() for p in minilm_params)
