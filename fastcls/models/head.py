"""The classification head: [CLS] pooling, dropout, a linear d x K layer and the cross-entropy loss.

    logits = dropout(h_CLS) @ W_C^T + b,   loss = cross_entropy(logits, y)

The implementation is chosen once, when the head is built:
- "fused": `fastcls.ops.classification_head` (mask-free dropout, one addmm, and the cross-entropy kernel that
  writes the logits' gradient in its forward pass); for label spaces of `LARGE_LABEL_SPACE` classes and more, a
  training step runs dropout then `fastcls.ops.linear_cross_entropy`, which never holds the rows x K logits (the
  step then returns no logits);
- "reference": PyTorch's dropout, linear layer and cross-entropy, for comparison.

Labels are trusted (they were checked against the label map when encoded): the kernels skip their target check,
which would cost a host sync on CUDA.
"""
import torch
import torch.nn.functional as F
from torch import nn

from fastcls.config import HEAD_IMPLS
from fastcls.ops import classification_head, cross_entropy_reference, dropout, linear_cross_entropy

# From this many classes a training step's logits outgrow the activations of the rows' h_CLS several times over
# (K x 4 bytes per row against d x 4): the fused linear + cross-entropy then saves their memory and one pass.
LARGE_LABEL_SPACE = 4096


class ClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, dropout_p: float, impl: str = "fused",
                 init_std: float = 0.02):
        super().__init__()
        if impl not in HEAD_IMPLS:
            raise ValueError(f"head impl must be one of {HEAD_IMPLS}, got {impl!r}")
        self.impl, self.dropout_p = impl, dropout_p
        self.linear = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)

    @property
    def num_labels(self) -> int:
        return self.linear.out_features

    def forward(self, h_cls: torch.Tensor, labels: torch.Tensor | None = None):
        """(mean cross-entropy against `labels` or None without them, logits [rows, K] or None where the fused
        linear + cross-entropy ran) for h_CLS [rows, d]."""
        weight, bias, p, training = self.linear.weight, self.linear.bias, self.dropout_p, self.training
        if labels is None:
            dropped = dropout(h_cls, p, training=training) if self.impl == "fused" else F.dropout(h_cls, p, training)
            return None, F.linear(dropped, weight, bias)
        if self.impl == "reference":
            logits = F.linear(F.dropout(h_cls, p, training), weight, bias)
            return cross_entropy_reference(logits, labels), logits
        if training and self.num_labels >= LARGE_LABEL_SPACE and torch.is_grad_enabled():
            loss = linear_cross_entropy(dropout(h_cls, p, training=True), weight, labels, linear_bias=bias,
                                        validate=False)
            return loss, None
        return classification_head(h_cls, weight, bias, labels, dropout_p=p, training=training, validate=False)

    def extra_repr(self) -> str:
        return f"impl={self.impl}, dropout_p={self.dropout_p}"
