"""Softmax cross-entropy with class-index targets: logits[N, K], target[N].

Same meaning as `torch.nn.functional.cross_entropy(logits, target, weight=..., ignore_index=...,
label_smoothing=..., reduction=...)`, including torch's weighted mean (sum_i loss_i / sum_i w[target_i] over kept
rows) and its label smoothing with class weights (loss_i = (1 - eps) * w[t] * nll_i + eps / K * sum_k w[k] *
(lse_i - x_ik)), except that a mean over a batch whose rows are all ignored is 0 rather than NaN. The loss is
fp32 (fp64 for fp64 logits), the gradient has the logits' dtype.

When the logits require grad, the kernels write the gradient in the same pass that computes the loss (each
logit read once, each gradient element written once); the backward only scales it by the incoming gradient,
which costs nothing when that is exactly 1 (checked on the CPU, and on the device by the Triton kernel itself,
so no host sync). The gradient lives in a new buffer unless `inplace_grad=True`, which writes it over the
logits: only safe when nothing else reads those logits afterwards (Liger-Kernel's in-place gradients corrupted
users' models, its issues 272 and 343). fastcls bumps the logits' autograd version counter in that case, so an
op that saved them for its own backward raises instead of silently using the gradient as logits.

Backends (registered below with `fastcls.ops.dispatch`, which `linear_cross_entropy` shares):

- cpp: fp32, bf16 and fp16 logits on CPU; fp64 runs the reference.
- triton: fp32, bf16 and fp16 logits on CUDA (or on CPU under TRITON_INTERPRET=1); fp64 runs the reference.
- reference: PyTorch, fp32 math (fp64 for fp64 logits), differentiated by autograd.

Out-of-range targets (neither ignore_index nor in [0, K)) raise IndexError naming the row. The C++ path finds
them while it sums the class weights of the kept rows; the Triton and reference paths check with one vectorised
comparison, which on CUDA costs a host sync: `validate=False` skips it on the Triton path (a bad row is then
treated as ignored, never read out of bounds), and it is skipped while torch.compile traces.
"""
import math

import torch
from torch.autograd.function import once_differentiable

from fastcls.ops import cpp, dispatch

REDUCTIONS = ("mean", "sum", "none")

dispatch.register_op("cross_entropy", cpp=cpp.CROSS_ENTROPY_DTYPES,
                     triton=(torch.float32, torch.bfloat16, torch.float16))


def check_options(n_classes: int, weight: torch.Tensor | None, label_smoothing: float, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if weight is not None:
        if weight.shape != (n_classes,):
            raise ValueError(f"weight must have one entry per class, shape ({n_classes},), got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")


def check_target(target: torch.Tensor, n_rows: int) -> None:
    if target.shape != (n_rows,):
        raise ValueError(f"target must be [N] = ({n_rows},), got shape {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold class indices (an integer tensor), got {target.dtype}")


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, weight, label_smoothing: float, reduction: str) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, K], got shape {tuple(logits.shape)}")
    check_target(target, logits.shape[0])
    check_options(logits.shape[1], weight, label_smoothing, reduction)


def check_target_range(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """IndexError naming the first row whose target is neither ignore_index nor in [0, n_classes)."""
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"cross_entropy: target {int(target[row])} in row {row} is outside [0, {n_classes}) "
            f"and is not ignore_index ({ignore_index})"
        )


def cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """PyTorch softmax cross-entropy in fp32 math (fp64 for fp64 logits), differentiable by autograd."""
    _check_inputs(logits, target, weight, label_smoothing, reduction)
    n_classes = logits.shape[1]
    if not torch.compiler.is_compiling():
        check_target_range(target, n_classes, ignore_index)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    kept = target != ignore_index
    safe_target = torch.where(kept, target, 0).long()
    lse = torch.logsumexp(x, dim=1)
    nll = lse - x.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    w = None if weight is None else weight.to(x.dtype)
    target_weight = kept.to(x.dtype) if w is None else torch.where(kept, w[safe_target], 0.0)
    loss_rows = target_weight * nll
    if label_smoothing > 0:
        spread = lse.unsqueeze(1) - x
        smooth = (spread if w is None else spread * w).sum(dim=1)
        loss_rows = (1 - label_smoothing) * loss_rows + torch.where(kept, smooth, 0.0) * (label_smoothing / n_classes)
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    return total / torch.where(kept.any(), target_weight.sum(), 1.0)


class RowKernel:
    """The loss (and optionally the gradient) of every row, on the cpp or triton backend, for logits with class
    stride 1. Also what `linear_cross_entropy` runs on each chunk of rows."""

    def __init__(self, backend: str, n_classes: int, weight: torch.Tensor | None, ignore_index: int,
                 label_smoothing: float, device: torch.device):
        self.backend, self.n_classes, self.ignore_index = backend, n_classes, ignore_index
        self.label_smoothing = float(label_smoothing)
        self.weight = None if weight is None else weight.detach().to(device=device, dtype=torch.float32).contiguous()

    def mean_divisor(self, target: torch.Tensor, validate: bool):
        """sum of w[target] over kept rows (1 where no row is kept, so that an all-ignored mean is 0): a float
        on the cpp path, where computing it also validates the targets, a 0-dim device tensor on the triton path."""
        if self.backend == "cpp":
            weight_sum, kept_rows = cpp.cross_entropy_target_summary(target, self.n_classes, self.ignore_index,
                                                                     self.weight)
            return weight_sum if kept_rows else 1.0
        if validate and not torch.compiler.is_compiling():
            check_target_range(target, self.n_classes, self.ignore_index)
        kept = (target != self.ignore_index) & (target >= 0) & (target < self.n_classes)
        if self.weight is None:
            return kept.sum().clamp_min(1).float()
        target_weight = torch.where(kept, self.weight[torch.where(kept, target, 0)], 0.0)
        return torch.where(kept.any(), target_weight.sum(), 1.0)

    def rows(self, logits: torch.Tensor, target: torch.Tensor, grad: torch.Tensor | None, grad_scale) -> torch.Tensor:
        """Per-row fp32 losses; writes grad_scale times the gradient into `grad` (class stride 1, the logits'
        dtype; may be `logits` itself) unless it is None. `grad_scale`: a float (cpp) or 0-dim tensor (triton)."""
        if self.backend == "triton":
            from fastcls.kernels.cross_entropy import cross_entropy_rows_triton as kernel
        else:
            kernel = cpp.cross_entropy_rows
        return kernel(logits, target, self.weight, self.ignore_index, self.label_smoothing, grad, grad_scale)


def reciprocal(divisor):
    """1 / divisor for a float (inf for 0, as a tensor division gives) or a tensor."""
    if isinstance(divisor, torch.Tensor):
        return divisor.reciprocal()
    return math.inf if divisor == 0 else 1.0 / divisor


def unit_scale(backend: str, device: torch.device):
    """A gradient scale of 1 as each backend takes it: a float (cpp) or a 0-dim device tensor (triton), filled on
    the device rather than copied from the host."""
    return torch.ones((), dtype=torch.float32, device=device) if backend == "triton" else 1.0


def scale_gradient_(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """grad *= grad_output in place (a scalar, or one value per row of grad), skipped where grad_output is 1."""
    if backend == "triton":
        from fastcls.kernels.cross_entropy import scale_rows_triton

        scale_rows_triton(grad, grad_output)
        return grad
    if grad_output.numel() == 1:
        if grad_output.item() != 1.0:  # a CPU tensor: no sync to pay
            grad.mul_(grad_output.to(grad.dtype))
        return grad
    return grad.mul_(grad_output.to(grad.dtype).unsqueeze(1))


CONSUMED_GRADIENT = (
    "cross_entropy: this graph's gradient was already used by an earlier backward. fastcls computes it in the "
    "forward and hands it over once (retain_graph=True is not supported); run the forward again instead."
)


class _CrossEntropyFunction(torch.autograd.Function):
    """Kernel-backed cross-entropy; `logits` must have class stride 1 and `target` be contiguous int64."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, reduction, backend, inplace_grad,
                validate):
        n_rows, n_classes = logits.shape
        kernel = RowKernel(backend, n_classes, weight, ignore_index, label_smoothing, logits.device)
        divisor = kernel.mean_divisor(target, validate)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = logits if inplace_grad else torch.empty((n_rows, n_classes), dtype=logits.dtype,
                                                           device=logits.device)
        scale = reciprocal(divisor) if reduction == "mean" else unit_scale(backend, logits.device)
        loss_rows = kernel.rows(logits, target, grad, scale)
        if inplace_grad and grad is not None:
            torch.autograd.graph.increment_version(logits)
        ctx.grad, ctx.backend = grad, backend
        if reduction == "none":
            return loss_rows
        total = loss_rows.sum()
        return total / divisor if reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(CONSUMED_GRADIENT)
        return scale_gradient_(grad, grad_output, ctx.backend), None, None, None, None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str | None = None,
    validate: bool = True,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """Softmax cross-entropy of logits[N, K] against class indices target[N], on the backend picked by dispatch.

    Returns a scalar for reduction "mean"/"sum" and per-row losses for "none", in fp32. `weight`: per-class
    rescaling weights [K]. `validate=False` skips the target check that costs a host sync on the Triton path.
    `inplace_grad=True` writes the gradient over the logits (see the module docstring: only when nothing else
    reads them).
    """
    _check_inputs(logits, target, weight, label_smoothing, reduction)
    backend = dispatch.backend_for("cross_entropy", logits.device, logits.dtype, backend=backend)
    if backend == "reference":
        return cross_entropy_reference(logits, target, weight, ignore_index, label_smoothing, reduction)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.to(torch.int64).contiguous()
    return _apply_kernels(logits, target, weight, ignore_index, float(label_smoothing), reduction, backend,
                          inplace_grad, validate)


# torch.compile runs the kernels eagerly (a graph break) instead of tracing into raw pointers and pybind calls.
@torch.compiler.disable
def _apply_kernels(*args):
    return _CrossEntropyFunction.apply(*args)
