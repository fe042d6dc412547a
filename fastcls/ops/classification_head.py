"""The [CLS] classification head and its loss: logits = dropout(h_CLS) @ W.T + b, loss = cross_entropy(logits, y).

Three kernels forward (mask-free dropout, one addmm, the cross-entropy kernel that also writes the logits'
gradient) and, backward, the two products of the linear layer, the bias sum and the dropout kernel again (the
mask is redrawn from its seed, not stored). Only row 0 of each sequence receives a gradient. Dropout is
`fastcls.ops.dropout`, so a seed gives the same mask on every backend and device; the cross-entropy is
`fastcls.ops.cross_entropy` with torch's options. Under autocast the linear layer runs in the autocast dtype,
as nn.Linear's would. Both kernels run inside torch.library custom ops ("fastcls::dropout",
"fastcls::cross_entropy_forward"), so torch.compile traces the whole head without a graph break.
"""
import torch
import torch.nn.functional as F

from fastcls.ops.cross_entropy import cross_entropy
from fastcls.ops.dropout import dropout


def cls_rows(hidden_states: torch.Tensor) -> torch.Tensor:
    """h_CLS [B, d]: row 0 of each sequence of hidden_states [B, L, d]; [B, d] passes through."""
    if hidden_states.ndim == 3:
        return hidden_states[:, 0]
    if hidden_states.ndim == 2:
        return hidden_states
    raise ValueError(f"hidden_states must be [B, L, d] or [B, d], got shape {tuple(hidden_states.shape)}")


def classification_head(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    *,
    dropout_p: float,
    training: bool = True,
    seed: int | None = None,
    class_weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of the [CLS] head for hidden_states [B, L, d] (or h_CLS [B, d]), weight [K, d] and bias [K]
    as in nn.Linear, target [B].

    `dropout_p` applies while `training` (mask from `seed`, or a fresh one drawn from torch's generator);
    `class_weight`, `ignore_index`, `label_smoothing` and `reduction` are torch's cross-entropy options (the
    class weights are called `weight` there). `backend` picks the kernels for dropout and cross-entropy alike;
    `validate=False` skips the target check that costs a host sync on CUDA.
    """
    h_cls = cls_rows(hidden_states)
    if weight.ndim != 2 or weight.shape[1] != h_cls.shape[-1]:
        raise ValueError(f"weight must be [K, d] with d = {h_cls.shape[-1]}, got shape {tuple(weight.shape)}")
    dropped = dropout(h_cls, dropout_p, training=training, seed=seed, backend=backend)
    logits = F.linear(dropped, weight, bias)
    loss = cross_entropy(logits, target, weight=class_weight, ignore_index=ignore_index,
                         label_smoothing=label_smoothing, reduction=reduction, backend=backend, validate=validate)
    return loss, logits
