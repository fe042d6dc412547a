"""Linear warmup, then linear, cosine or constant decay, as a multiplier of the base learning rate."""
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
