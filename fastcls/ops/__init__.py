"""Kernel-backed ops, each with a PyTorch reference; each op module registers its kernels with `dispatch`, which
picks the backend per call (`op_backends` reports the choice per op and device)."""
from fastcls.ops import dispatch
from fastcls.ops.bias_gelu import bias_gelu, bias_gelu_reference
from fastcls.ops.classification_head import classification_head
from fastcls.ops.cross_entropy import cross_entropy, cross_entropy_reference
from fastcls.ops.dispatch import op_backends
from fastcls.ops.dropout import Dropout, dropout, dropout_reference
from fastcls.ops.dropout_add_layer_norm import (
    dropout_add_layer_norm,
    dropout_add_layer_norm_reference,
    layer_norm_dropout,
    layer_norm_dropout_reference,
)
from fastcls.ops.linear import linear
from fastcls.ops.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from fastcls.ops.multi_task_cross_entropy import (
    multi_task_cross_entropy,
    multi_task_cross_entropy_reference,
)
from fastcls.ops.multi_task_head import multi_task_head
from fastcls.ops.varlen_attention import varlen_attention, varlen_attention_reference

__all__ = [
    "Dropout", "bias_gelu", "bias_gelu_reference", "classification_head", "cross_entropy", "cross_entropy_reference", "dispatch", "dropout",
    "dropout_add_layer_norm", "dropout_add_layer_norm_reference", "dropout_reference", "layer_norm_dropout",
    "layer_norm_dropout_reference", "linear", "linear_cross_entropy", "linear_cross_entropy_reference",
    "multi_task_cross_entropy", "multi_task_cross_entropy_reference", "multi_task_head", "op_backends",
    "varlen_attention", "varlen_attention_reference",
]
