"""AdamW with bias correction, decoupled weight decay kept off biases and normalisation weights: fastcls's
FusedAdamW (one launch per group, no host sync; Triton on CUDA, C++ on the CPU). Its groups' lr starts as a
float; `fastcls.components.lr_schedule.DeviceLRSchedule` turns it into a device tensor, as a step captured in a
CUDA graph needs."""
from dataclasses import dataclass

import torch
from torch import nn

from fastcls.optim import FusedAdamW


@dataclass
class OptimizerConfig:
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def _is_norm(module: nn.Module) -> bool:
    # HF models use their own LayerNorm/RMSNorm classes besides torch's
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


# Adam moves a parameter by about its learning rate per step: at a fine-tuning rate (5e-5) a multi-task head's
# learned log-variances (uncertainty weighting) would stay near 0 for a whole run, so they learn this much faster
LOG_VARIANCE_LR_SCALE = 100.0


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Two groups: decayed matrices, and undecayed biases and norm weights (BERT's recipe); given `lr`, a third
    for learned loss log-variances (`MultiTaskHead`), at `LOG_VARIANCE_LR_SCALE` x lr without decay."""
    no_decay: set[int] = set()
    for module in model.modules():
        if _is_norm(module):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, plain, log_variances = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if lr is not None and name.endswith("log_variance"):
            log_variances.append(p)
            continue
        (plain if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    if log_variances:
        groups.append({"params": log_variances, "weight_decay": 0.0, "lr": lr * LOG_VARIANCE_LR_SCALE})
    return groups


def build_optimizer(groups: list[dict], cfg: OptimizerConfig, sharded: bool = False) -> torch.optim.Optimizer:
    """FusedAdamW over `param_groups`' groups (their weight decay set there). `sharded`: FSDP2's DTensor
    parameters, which FusedAdamW's address tables do not take: torch's AdamW (the same update) runs on them."""
    if sharded:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)
    return FusedAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
