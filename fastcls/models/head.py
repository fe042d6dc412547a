"""The classification heads: dropout, a linear d x K layer and the cross-entropy loss on each row's pooled vector
h (h_CLS, or the mean of the row's tokens: `fastcls.models.pooling`); for multi-task runs one such head per task,
all run as one op (`MultiTaskHead`).

    logits = dropout(h) @ W_C^T + b,   loss = cross_entropy(logits, y)

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
from fastcls.data.collate import IGNORED_LABEL
from fastcls.ops import (classification_head, cross_entropy_reference, dropout, linear_cross_entropy,
                         multi_task_cross_entropy_reference, multi_task_head)

# From this many classes a training step's logits outgrow the activations of the rows' pooled vectors several times over
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

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None):
        """(mean cross-entropy against `labels` or None without them, logits [rows, K] or None where the fused
        linear + cross-entropy ran) for the pooled vectors h [rows, d]."""
        weight, bias, p, training = self.linear.weight, self.linear.bias, self.dropout_p, self.training
        if labels is None:
            dropped = dropout(h, p, training=training) if self.impl == "fused" else F.dropout(h, p, training)
            return None, F.linear(dropped, weight, bias)
        if self.impl == "reference":
            logits = F.linear(F.dropout(h, p, training), weight, bias)
            return cross_entropy_reference(logits, labels), logits
        if training and self.num_labels >= LARGE_LABEL_SPACE and torch.is_grad_enabled():
            loss = linear_cross_entropy(dropout(h, p, training=True), weight, labels, linear_bias=bias,
                                        validate=False)
            return loss, None
        return classification_head(h, weight, bias, labels, dropout_p=p, training=training, validate=False)

    def extra_repr(self) -> str:
        return f"impl={self.impl}, dropout_p={self.dropout_p}"


class MultiTaskHead(nn.Module):
    """One head per task over the pooled vector, as ONE linear layer over the tasks' concatenated weights
    [sum K_t, d] and one cross-entropy launch over each task's segment of the logits (`fastcls.ops.multi_task_head`).

        loss = sum_t alpha_t * mean over the rows labelled for task t of CE_t

    Rows lacking a task's label (-100) add nothing to it. `weights`: alpha_t, fixed; `uncertainty`: Kendall et
    al. 2018's learned weighting instead, alpha_t = exp(-s_t) with a learned log-variance s_t (starting at 0) and
    s_t / 2 added to the loss, so that alpha_t settles near 1 / (2 L_t).

    h may be [rows, d] (every task reads the shared encoder's pooled vector) or [T, rows, d] (each task its own, from
    task-specific top layers). `label_counts` [T]: the labelled rows of each task in the whole global batch, and
    `row_share` this batch's share of its rows, so that a rank's part of a global batch under torchrun is weighted
    as that batch's mean (default: the counts of `labels` itself, share 1)."""

    def __init__(self, hidden_size: int, num_labels: list[int], dropout_p: float, impl: str = "fused",
                 init_std: float = 0.02, weights: list[float] | None = None, uncertainty: bool = False):
        super().__init__()
        if impl not in HEAD_IMPLS:
            raise ValueError(f"head impl must be one of {HEAD_IMPLS}, got {impl!r}")
        self.impl, self.dropout_p, self.task_num_labels = impl, dropout_p, list(num_labels)
        self.linear = nn.Linear(hidden_size, sum(num_labels))
        nn.init.normal_(self.linear.weight, std=init_std)
        nn.init.zeros_(self.linear.bias)
        weights = [1.0 / len(num_labels)] * len(num_labels) if weights is None else weights
        self.register_buffer("task_weights", torch.tensor(weights, dtype=torch.float32))
        self.log_variance = nn.Parameter(torch.zeros(len(num_labels))) if uncertainty else None

    @property
    def num_labels(self) -> int:
        return self.linear.out_features

    def alphas(self) -> torch.Tensor:
        return self.task_weights if self.log_variance is None else torch.exp(-self.log_variance)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None, label_counts: torch.Tensor | None = None,
                row_share: float = 1.0):
        weight, bias, p, training = self.linear.weight, self.linear.bias, self.dropout_p, self.training
        scale = None
        if labels is not None:
            counts = (labels != IGNORED_LABEL).sum(0) if label_counts is None else label_counts.to(labels.device)
            scale = self.alphas() / counts.clamp(min=1).to(torch.float32)
        if self.impl == "reference":
            loss, logits = self._reference(h, labels, scale)
        else:
            loss, _, logits = multi_task_head(h, weight, bias, labels, self.task_num_labels, scale, dropout_p=p,
                                              training=training, validate=False)
        if loss is not None and self.log_variance is not None:
            loss = loss + 0.5 * row_share * self.log_variance.sum()
        return loss, logits

    def _reference(self, h, labels, scale):
        """PyTorch's dropout, linear layers and per-task cross-entropy sums."""
        dropped = F.dropout(h, self.dropout_p, self.training)
        weight, bias = self.linear.weight, self.linear.bias
        if dropped.ndim == 2:
            logits = F.linear(dropped, weight, bias)
        else:
            logits = torch.cat([F.linear(x, w, b) for x, w, b in zip(dropped, weight.split(self.task_num_labels),
                                                                     bias.split(self.task_num_labels), strict=True)],
                               dim=1)
        if labels is None:
            return None, logits
        loss, _ = multi_task_cross_entropy_reference(logits, labels, self.task_num_labels, scale)
        return loss, logits

    def extra_repr(self) -> str:
        return f"tasks={self.task_num_labels}, impl={self.impl}, dropout_p={self.dropout_p}"
