"""Kernel-backed ops, each with a PyTorch reference; `dispatch` picks the backend per call."""
import warnings

import torch

from fastcls.ops import dispatch
from fastcls.ops.classification_head import classification_head
from fastcls.ops.cross_entropy import cross_entropy, cross_entropy_reference
from fastcls.ops.dropout import Dropout, dropout, dropout_reference
from fastcls.ops.dropout_add_layer_norm import (
    dropout_add_layer_norm,
    dropout_add_layer_norm_reference,
    layer_norm_dropout,
    layer_norm_dropout_reference,
)
from fastcls.ops.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

# Every op dispatches through dispatch.pick_backend; a new op adds its name here to show up in `fastcls info`.
OPS = ("adamw", "classification_head", "cross_entropy", "dropout", "dropout_add_layer_norm", "layer_norm_dropout",
       "linear_cross_entropy")


def op_backends() -> dict[str, dict[str, str]]:
    """The backend each op runs with on CPU and on CUDA tensors in this process, e.g. {"cross_entropy": {"cpu":
    "cpp", "cuda": "triton"}}; reflects FASTCLS_BACKEND and what was built or installed."""
    with warnings.catch_warnings():
        # A forced backend that is unavailable warns at pick time; here the answer itself says so.
        warnings.simplefilter("ignore")
        per_device = {device: dispatch.pick_backend(torch.device(device)) for device in ("cpu", "cuda")}
    return {op: dict(per_device) for op in OPS}


__all__ = [
    "OPS", "Dropout", "classification_head", "cross_entropy", "cross_entropy_reference", "dispatch", "dropout",
    "dropout_add_layer_norm", "dropout_add_layer_norm_reference", "dropout_reference", "layer_norm_dropout",
    "layer_norm_dropout_reference", "linear_cross_entropy", "linear_cross_entropy_reference", "op_backends",
]
