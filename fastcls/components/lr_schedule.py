"""Linear warmup, then linear, cosine or constant decay, as a multiplier of the base learning rate.

Two drivers of the same multiplier (`lr_factor`): `build_scheduler`, a LambdaLR that writes a Python float into
each param group's lr, and `DeviceLRSchedule`, which keeps the rate and the step count in device tensors and
updates them with tensor ops, so that a CUDA graph capturing `optimizer.step(); schedule.step()` replays the
schedule instead of the rate it saw at capture.
"""
import math
from dataclasses import dataclass

import torch

DECAYS = ("linear", "cosine", "constant")


@dataclass
class ScheduleConfig:
    total_steps: int
    warmup_steps: int = 0
    decay: str = "linear"
    # warmup starts from this fraction of the peak rate (0 = from zero, as BERT and HF do)
    warmup_start_factor: float = 0.0
    # decay ends at this fraction of the peak rate
    final_factor: float = 0.0


def lr_factor(step: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak learning rate for the update made at `step` (0-based)."""
    if cfg.decay not in DECAYS:
        raise ValueError(f"--decay must be one of {DECAYS}, got {cfg.decay!r}")
    if step < cfg.warmup_steps:
        frac = step / cfg.warmup_steps
        return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * frac
    if cfg.decay == "constant":
        return 1.0
    decay_steps = max(1, cfg.total_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.decay == "linear":
        shape = 1.0 - frac
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.final_factor + (1.0 - cfg.final_factor) * shape


def resolve_warmup_steps(warmup: float, total_steps: int) -> int:
    """`--warmup` below 1 is a ratio of the total steps, 1 or more a step count."""
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    steps = round(warmup * total_steps) if warmup < 1 else int(warmup)
    return min(steps, total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


class DeviceLRSchedule:
    """`build_scheduler`'s schedule computed on the device, for an optimizer step captured in a CUDA graph.

    Construction replaces each param group's lr by a 0-dim fp32 tensor on the device of the group's parameters,
    holding the rate of the first update: base · lr_factor(0), the base rate being group["initial_lr"] (set from
    group["lr"] where absent, as LambdaLR sets it). The optimizer must read its lr from that tensor, as FusedAdamW
    does. The step count is an fp64 0-dim tensor on the first parameter's device. `step()` counts a step and
    writes base · lr_factor(count) into the lr tensors in place, with tensor ops only (in fp64): no host read of
    a tensor value and no Python branch on one, the same kernels with the same arguments every call. So
    `optimizer.step(); schedule.step()` captured once replays the whole schedule.

    For LambdaLR's users: `get_last_lr()` (reads the tensors back: a sync on CUDA), `lrs_after(steps)` (the same
    rates computed on the host, no sync), `state_dict()` / `load_state_dict()` (the step count and base rates;
    loading writes into the existing tensors, so a graph captured before stays valid).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig):
        if cfg.decay not in DECAYS:
            raise ValueError(f"--decay must be one of {DECAYS}, got {cfg.decay!r}")
        self.optimizer, self.cfg = optimizer, cfg
        fallback = next((p.device for group in optimizer.param_groups for p in group["params"]), torch.device("cpu"))
        devices = [group["params"][0].device if group["params"] else fallback for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            initial = group["lr"]
            group.setdefault("initial_lr", initial.clone() if isinstance(initial, torch.Tensor) else initial)
        # read once, here: the host copies serve lrs_after and state_dict, the device copies step()
        self.base_lrs = [float(group["initial_lr"]) for group in optimizer.param_groups]
        self._base_tensors = [torch.tensor(base, dtype=torch.float64, device=device)
                              for base, device in zip(self.base_lrs, devices, strict=True)]
        self.step_count = torch.zeros((), dtype=torch.float64, device=fallback)
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for device in devices]
        self._install()

    def _factor(self) -> torch.Tensor:
        """lr_factor(step_count) as a 0-dim fp64 tensor: every branch computed, the right one selected."""
        cfg, t = self.cfg, self.step_count
        warmup = cfg.warmup_steps
        warm = (t / max(1, warmup)).mul_(1.0 - cfg.warmup_start_factor).add_(cfg.warmup_start_factor)
        if cfg.decay == "constant":
            return torch.where(t < warmup, warm, 1.0)
        frac = ((t - warmup) / max(1, cfg.total_steps - warmup)).clamp_(max=1.0)
        shape = 1.0 - frac if cfg.decay == "linear" else frac.mul_(math.pi).cos_().add_(1.0).mul_(0.5)
        decayed = shape.mul_(1.0 - cfg.final_factor).add_(cfg.final_factor)
        return torch.where(t < warmup, warm, decayed)

    def _write(self) -> None:
        factor = self._factor()
        for lr, base in zip(self.lrs, self._base_tensors, strict=True):
            torch.mul(base, factor.to(lr.device), out=lr)

    def _install(self) -> None:
        """Write the current rates and make the lr tensors the groups' (again, after optimizer.load_state_dict
        replaced them)."""
        self._write()
        for group, lr in zip(self.optimizer.param_groups, self.lrs, strict=True):
            group["lr"] = lr

    def step(self) -> None:
        """Count a step and write the rate of the next update into the groups' lr tensors."""
        for index, (group, lr) in enumerate(zip(self.optimizer.param_groups, self.lrs, strict=True)):
            if group["lr"] is not lr:  # an identity check: no device read
                raise RuntimeError(f"param group {index}'s lr is no longer the schedule's tensor (replaced by "
                                   f"optimizer.load_state_dict?): call this schedule's load_state_dict after it")
        self.step_count.add_(1.0)
        self._write()

    def lrs_after(self, steps: int) -> list[float]:
        """The groups' rates after `steps` calls of step(), computed on the host: what get_last_lr() reads back
        then, for logging without waiting for the device."""
        return [base * lr_factor(steps, self.cfg) for base in self.base_lrs]

    def get_last_lr(self) -> list[float]:
        """The groups' current rates, read from the device (on CUDA this waits for the queued work)."""
        return [float(lr) for lr in self.lrs]

    def state_dict(self) -> dict:
        """{"last_epoch": steps taken, "base_lrs": [...]}, LambdaLR's keys; reads the step count back (a sync
        on CUDA)."""
        return {"last_epoch": int(self.step_count), "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`'s output, in place; call it after optimizer.load_state_dict."""
        if len(state["base_lrs"]) != len(self.lrs):
            raise ValueError(f"the state holds {len(state['base_lrs'])} base rates, the optimizer has "
                             f"{len(self.lrs)} param groups")
        self.base_lrs = [float(base) for base in state["base_lrs"]]
        for tensor, base in zip(self._base_tensors, self.base_lrs, strict=True):
            tensor.fill_(base)
        self.step_count.fill_(float(state["last_epoch"]))
        self._install()
