import math

import pytest
import torch

from fastcls.components.lr_schedule import (
    ScheduleConfig,
    build_scheduler,
    lr_factor,
    resolve_warmup_steps,
)


def test_linear_decay_worked_example():
    # linear decay from 0.001 to 0 over 1000 steps gives 0.0005 at step 500
    cfg = ScheduleConfig(total_steps=1000, warmup_steps=0, decay="linear")
    assert 0.001 * lr_factor(500, cfg) == pytest.approx(0.0005, rel=1e-12)
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(1000, cfg) == 0.0


def test_linear_warmup_worked_example():
    # linear warmup from 0.00001 to 0.001 over 100 steps gives 0.000505 at step 50
    cfg = ScheduleConfig(total_steps=1000, warmup_steps=100, decay="linear", warmup_start_factor=0.00001 / 0.001)
    assert 0.001 * lr_factor(50, cfg) == pytest.approx(0.000505, rel=1e-12)
    assert 0.001 * lr_factor(0, cfg) == pytest.approx(0.00001, rel=1e-12)
    assert lr_factor(100, cfg) == pytest.approx(1.0)


def test_cosine_and_constant():
    cos = ScheduleConfig(total_steps=110, warmup_steps=10, decay="cosine")
    assert lr_factor(10, cos) == pytest.approx(1.0)
    assert lr_factor(60, cos) == pytest.approx(0.5)
    assert lr_factor(110, cos) == pytest.approx(0.0, abs=1e-12)
    const = ScheduleConfig(total_steps=100, warmup_steps=10, decay="constant")
    assert lr_factor(5, const) == pytest.approx(0.5)
    assert all(lr_factor(s, const) == 1.0 for s in range(10, 100))


def test_warmup_ratio_or_steps():
    assert resolve_warmup_steps(0.06, 125) == 8
    assert resolve_warmup_steps(30, 125) == 30
    assert resolve_warmup_steps(500, 125) == 125
    with pytest.raises(ValueError, match="--warmup"):
        resolve_warmup_steps(-1, 10)


def test_scheduler_drives_optimizer_lr():
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([w], lr=0.001)
    sched = build_scheduler(opt, ScheduleConfig(total_steps=20, warmup_steps=4, decay="linear"))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == 0.0
    assert seen[2] == pytest.approx(0.0005)
    assert seen[4] == pytest.approx(0.001)
    assert seen[12] == pytest.approx(0.001 * (1 - 8 / 16))
    assert all(b <= a for a, b in zip(seen[4:], seen[5:], strict=False))
    assert math.isclose(seen[-1], 0.001 / 16)
