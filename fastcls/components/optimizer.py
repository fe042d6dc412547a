"""AdamW with bias correction, decoupled weight decay kept off biases and normalisation weights: fastcls's
FusedAdamW (one launch per group, no host sync; Triton on CUDA, C++ on the CPU). Its groups' lr starts as a
float; `fastcls.components.lr_schedule.DeviceLRSchedule` turns it into a device tensor, as a step captured in a
CUDA graph needs.

Layer-wise learning-rate decay (`--layer-lr-decay XI`; ELECTRA's fine-tuning recipe, Zhang et al. 2021): a
parameter at depth e from the top gets lr * XI**e: the head e = 0, the top encoder layer 1, each layer below one
more, the embeddings (and whatever the encoder registers before its first layer, such as ELECTRA's
embeddings_project) L + 1 for L layers. A task's own copy of a top layer (multi-task `--task-layers`) stands at
that layer's depth. Parameters of the encoder in neither its layers nor its embeddings that come after the first
layer (a final norm above the layers, MPNet's relative attention bias that every layer reads) take the top
layer's factor: they act on the top layer's output or as part of every layer, never below the first. The groups
are one per (depth, decay or not); the schedule scales each group's own base rate."""
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastcls.errors import ConfigError
from fastcls.models.families import encoder_embeddings, encoder_layers
from fastcls.optim import FusedAdamW


@dataclass
class OptimizerConfig:
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    bias_correction: bool = True  # off: BERT's original Adam (BERTAdam), for comparison only
    master_weights: bool = False  # fp32 masters for bf16 parameters (fastcls.components.bf16_weights)
    max_grad_norm: float = 0.0  # > 0: FusedAdamW clips the gradients' total norm inside its step


def _is_norm(module: nn.Module) -> bool:
    # HF models use their own LayerNorm/RMSNorm classes besides torch's
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(module).__name__


# Adam moves a parameter by about its learning rate per step: at a fine-tuning rate (5e-5) a multi-task head's
# learned log-variances (uncertainty weighting) would stay near 0 for a whole run, so they learn this much faster
LOG_VARIANCE_LR_SCALE = 100.0


def depths(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> its depth e from the top (the module doc) for an `EncoderClassifier`; parameters outside
    the encoder and its task layers (the head) are absent: depth 0."""
    encoder, task_layers = model.encoder, getattr(model, "task_layers", None)
    try:
        shared = list(encoder_layers(encoder))
    except ValueError as err:
        raise ConfigError(f"--layer-lr-decay: {err}") from None
    stacks = [shared + list(copy) for copy in task_layers.copies] if task_layers is not None else [shared]
    count = len(stacks[0])
    depth = {id(p): count - index for stack in stacks for index, layer in enumerate(stack) for p in layer.parameters()}
    try:
        depth.update((id(p), count + 1) for p in encoder_embeddings(encoder).parameters())
    except (AttributeError, NotImplementedError):  # no embeddings module to name: placed by the order below
        pass
    below_the_layers = True
    for p in encoder.parameters():  # in registration order: embeddings, then the layers, then what sits above
        if id(p) not in depth:
            depth[id(p)] = count + 1 if below_the_layers else 1
        elif depth[id(p)] <= count:
            below_the_layers = False
    return depth


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 layer_lr_decay: float = 1.0) -> list[dict]:
    """Decayed matrices, and undecayed biases and norm weights (BERT's recipe): two groups, or with
    `layer_lr_decay` < 1 two per depth (the module doc), head first, each with its "lr". Given `lr`, a last group
    for learned loss log-variances (`MultiTaskHead`), at `LOG_VARIANCE_LR_SCALE` x lr without decay. Frozen
    parameters are left out."""
    if layer_lr_decay != 1.0 and lr is None:
        raise ValueError("layer-wise lr decay needs the base lr")
    no_decay: set[int] = set()
    for module in model.modules():
        if _is_norm(module):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    depth = depths(model) if layer_lr_decay != 1.0 else {}
    by_depth: dict[tuple[int, bool], list] = {}
    log_variances = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if lr is not None and name.endswith("log_variance"):
            log_variances.append(p)
            continue
        by_depth.setdefault((depth.get(id(p), 0), not (p.ndim < 2 or id(p) in no_decay)), []).append(p)
    groups = []
    for e, decayed in sorted(by_depth, key=lambda key: (key[0], not key[1])):
        group = {"params": by_depth[e, decayed], "weight_decay": weight_decay if decayed else 0.0}
        if layer_lr_decay != 1.0:
            group["lr"] = lr * layer_lr_decay ** e
        groups.append(group)
    if log_variances:
        groups.append({"params": log_variances, "weight_decay": 0.0, "lr": lr * LOG_VARIANCE_LR_SCALE})
    return groups


def build_optimizer(groups: list[dict], cfg: OptimizerConfig, sharded: bool = False,
                    factory: Callable[[list[dict]], torch.optim.Optimizer] | None = None) -> torch.optim.Optimizer:
    """FusedAdamW over `param_groups`' groups (their weight decay and rates set there), or `factory(groups)`, an
    optimizer of the caller's. `sharded`: FSDP2's DTensor parameters, which FusedAdamW's address tables do not
    take: torch's AdamW (the same update, always bias-corrected) runs on them. FusedAdamW clips to
    `cfg.max_grad_norm` itself; the training step clips for the others."""
    if factory is not None:
        if not cfg.bias_correction:
            raise ConfigError("--bias-correction off applies to fastcls's FusedAdamW, not to an optimizer of your own")
        return factory(groups)
    if sharded:  # TrainConfig.resolve refuses --bias-correction off with --fsdp
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)
    return FusedAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, bias_correction=cfg.bias_correction,
                      master_weights=cfg.master_weights, max_grad_norm=cfg.max_grad_norm)


def describe_lr_decay(groups: list[dict], lr: float, layer_lr_decay: float) -> str:
    """", layer-wise lr decay 0.9 (lowest at lr x 0.53)" for the run's first line; "" when off."""
    if layer_lr_decay == 1.0:
        return ""
    # a schedule keeps each group's base rate as "initial_lr" and its current one, perhaps 0 in warmup, as "lr"
    lowest = min(float(group.get("initial_lr", group["lr"])) for group in groups) / lr
    return f", layer-wise lr decay {layer_lr_decay:g} (lowest at lr x {lowest:.2g})"
