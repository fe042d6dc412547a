"""Softmax cross-entropy with class-index targets: logits[N, K], target[N].

Same meaning as `torch.nn.functional.cross_entropy(logits, target, weight=..., ignore_index=...,
label_smoothing=..., reduction=...)`, including torch's weighted mean (sum_i loss_i / sum_i w[target_i] over kept
rows) and its label smoothing with class weights (loss_i = (1 - eps) * w[t] * nll_i + eps / K * sum_k w[k] *
(lse_i - x_ik)), except that a mean over a batch whose rows are all ignored is 0 rather than NaN. The loss is
fp32 (fp64 for fp64 logits), the gradient has the logits' dtype.

When the logits require grad, the kernels write the gradient in the same pass that computes the loss (each
logit read once, each gradient element written once); the backward only scales it by the incoming gradient,
which costs nothing when that is exactly 1 (checked on the CPU, and on the device by the Triton kernel itself,
so no host sync). The gradient is handed over once: a second eager backward through the same graph
(retain_graph=True) raises instead of scaling it again.

The kernels run inside the torch.library custom op "fastcls::cross_entropy_forward"(logits, target, weight,
ignore_index, label_smoothing, reduction, backend, with_grad) -> (loss, grad), so torch.compile traces through
it (no graph break) and a CUDA graph captures it (nothing on the default path reads the device from the host).
`grad` is the gradient for an upstream gradient of 1 (an empty tensor without `with_grad`, which must be set
when the logits need a gradient); the op's autograd saves it, and its backward scales it and hands it over.
Eagerly the op's implementation, autograd context and backward run without the dispatcher
(`fastcls.ops.library.KernelOp`: dispatching would add 60% to the host time of a small batch's step) and the
scaling is in place, by the kernels above. In a trace (torch.compile's AOT autograd) the scaling is a
multiplication the compiler sees, since a traced backward may not write over a forward output: no host sync
either way, but the compiled backward always passes over the gradient once.

`inplace_grad=True` writes the gradient over the logits instead of into a new buffer: only safe when nothing
else reads those logits afterwards (Liger-Kernel's in-place gradients corrupted users' models, its issues 272
and 343). fastcls bumps the logits' autograd version counter then, so an op that saved them for its own backward
raises instead of silently using the gradient as logits. torch.library differentiates only ops that write no
input, so this path is no custom op and eager only: torch.compile breaks the graph around it.

Backends (registered below with `fastcls.ops.dispatch`, which `linear_cross_entropy` shares):

- cpp: fp32, bf16 and fp16 logits on CPU; fp64 runs the reference.
- triton: fp32, bf16 and fp16 logits on CUDA (or on CPU under TRITON_INTERPRET=1); fp64 runs the reference.
- reference: PyTorch, fp32 math (fp64 for fp64 logits), differentiated by autograd.

Out-of-range targets (neither ignore_index nor in [0, K)) raise IndexError naming the row. The C++ path finds
them while it sums the class weights of the kept rows; the Triton and reference paths check with one vectorised
comparison, which on CUDA costs a host sync: `validate=False` skips it on the Triton path (a bad row is then
treated as ignored, never read out of bounds), and it is skipped while torch.compile traces and while a CUDA
graph is captured.
"""
import math

import torch
from torch.autograd.function import once_differentiable

from fastcls.ops import cpp, dispatch
from fastcls.ops.library import KernelOp, traced

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
    check_target_range_eagerly(target, n_classes, ignore_index)
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
        self.label_smoothing = label_smoothing
        self.weight = None if weight is None else weight.to(device=device, dtype=torch.float32).contiguous()

    def mean_divisor(self, target: torch.Tensor, reduction: str):
        """For "mean": the sum of w[target] over kept rows (1 where no row is kept, so that an all-ignored mean is
        0) and the scale of its gradient, 1 / that; floats on the cpp path, one-element device tensors on the
        triton path. (None, None) for the other reductions, except on the cpp path, where computing them also
        validates the targets."""
        if self.backend == "cpp":
            weight_sum, kept_rows = cpp.cross_entropy_target_summary(target, self.n_classes, self.ignore_index,
                                                                     self.weight)
            divisor = weight_sum if kept_rows else 1.0
            return divisor, math.inf if divisor == 0 else 1.0 / divisor
        if reduction != "mean":
            return None, None
        from fastcls.kernels.cross_entropy import target_summary_triton

        summary = target_summary_triton(target, self.weight, self.n_classes, self.ignore_index)
        return summary[0], summary[1:]

    def rows(self, logits: torch.Tensor, target: torch.Tensor, grad: torch.Tensor | None, grad_scale) -> torch.Tensor:
        """Per-row fp32 losses; writes grad_scale times the gradient into `grad` (class stride 1, the logits'
        dtype; may be `logits` itself) unless it is None. `grad_scale`: a float (cpp), a one-element device tensor
        (triton), or None for 1."""
        if self.backend == "triton":
            from fastcls.kernels.cross_entropy import cross_entropy_rows_triton

            return cross_entropy_rows_triton(logits, target, self.weight, self.ignore_index, self.label_smoothing,
                                             grad, grad_scale)
        return cpp.cross_entropy_rows(logits, target, self.weight, self.ignore_index, self.label_smoothing, grad,
                                      1.0 if grad_scale is None else grad_scale)


def reduce_rows(loss_rows: torch.Tensor, reduction: str, divisor) -> torch.Tensor:
    """The loss from per-row losses (a fresh tensor); `divisor`: what `RowKernel.mean_divisor` gave."""
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total.div_(divisor) if reduction == "mean" else total


def check_target_range_eagerly(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """check_target_range, except while torch.compile traces or a CUDA graph is captured: there the host cannot
    read the targets, and the kernels treat a bad row as ignored."""
    if torch.compiler.is_compiling() or (target.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    check_target_range(target, n_classes, ignore_index)


def scale_gradient_(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> None:
    """grad *= grad_output in place: a scalar, or one value per row of a 2-D grad; skipped where grad_output is
    exactly 1, without a host sync on the triton path."""
    if backend == "triton":
        from fastcls.kernels.cross_entropy import scale_rows_triton

        scale_rows_triton(grad.view(1, -1) if grad.ndim == 1 else grad, grad_output)
    elif grad_output.numel() == 1:
        if grad_output.item() != 1.0:  # a CPU tensor on the cpp path: no sync to pay
            grad.mul_(grad_output)
    else:
        grad.mul_(grad_output.unsqueeze(1))


def scale_gradient(grad: torch.Tensor, grad_output: torch.Tensor, backend: str) -> torch.Tensor:
    """grad scaled by grad_output (a scalar, or one value per row), in grad's dtype. Eagerly that is
    `scale_gradient_`, in place and free when grad_output is 1. Where AOT autograd traces the backward (its
    tensor subclasses; torch.compile), plain tensor ops giving a new tensor: a traced backward may not write
    over the forward op's output, and the compiler fuses them or reuses the buffer."""
    if traced(grad, grad_output):
        per_row = grad_output.reshape(grad_output.shape + (1,) * (grad.ndim - grad_output.ndim))
        return (grad * per_row).to(grad.dtype)
    scale_gradient_(grad, grad_output, backend)
    return grad


CONSUMED_GRADIENT = (
    "cross_entropy: this graph's gradient was already used by an earlier backward. fastcls computes it in the "
    "forward and hands it over once (retain_graph=True is not supported); run the forward again instead."
)


def _forward(logits, target, weight, ignore_index, label_smoothing, reduction, backend, grad) -> torch.Tensor:
    """The loss, writing its gradient (for an upstream gradient of 1) into `grad` unless that is None."""
    kernel = RowKernel(backend, logits.shape[1], weight, ignore_index, label_smoothing, logits.device)
    divisor, mean_scale = kernel.mean_divisor(target, reduction)
    loss_rows = kernel.rows(logits, target, grad, mean_scale if reduction == "mean" else None)
    return reduce_rows(loss_rows, reduction, divisor)


def _forward_impl(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                  label_smoothing: float, reduction: str, backend: str,
                  with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if with_grad else None
    loss = _forward(logits, target, weight, ignore_index, label_smoothing, reduction, backend, grad)
    return loss, grad if with_grad else logits.new_empty(0)


def _forward_fake(logits, target, weight, ignore_index, label_smoothing, reduction, backend, with_grad):
    loss = logits.new_empty(logits.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty(logits.shape if with_grad else (0,))


def _setup_forward(ctx, inputs, output):
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # the gradient output's own gradient stays None, not an [N, K] of zeros
    ctx.grad, ctx.backend = grad, inputs[6]


def take_gradient(ctx, grad_output: torch.Tensor) -> torch.Tensor:
    """The gradient the forward left in ctx.grad, scaled by grad_output; once only."""
    grad, ctx.grad = ctx.grad, None
    if grad is None:
        raise RuntimeError(CONSUMED_GRADIENT)
    return scale_gradient(grad, grad_output, ctx.backend)


def _gradients(ctx, grad_loss):
    grad = take_gradient(ctx, grad_loss) if ctx.needs_input_grad[0] else None
    return grad, None, None, None, None, None, None, None


_gradients_once = once_differentiable(_gradients)


def _backward(ctx, grad_loss, _grad_of_grad):
    # Only a backward that builds a graph (create_graph=True) needs once_differentiable's refusal to be
    # differentiated, and its wrapper costs a tenth of a small batch's step.
    if torch.is_grad_enabled():
        return _gradients_once(ctx, grad_loss)
    return _gradients(ctx, grad_loss)


_forward_op = KernelOp("cross_entropy_forward", _forward_impl, _forward_fake).with_autograd(_backward,
                                                                                           _setup_forward)


class _GradientOverLogits(torch.autograd.Function):
    """The eager-only `inplace_grad=True` path: the gradient written over the logits, which must have class
    stride 1."""

    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, reduction, backend):
        loss = _forward(logits, target, weight, ignore_index, label_smoothing, reduction, backend, logits)
        torch.autograd.graph.increment_version(logits)
        ctx.grad, ctx.backend = logits, backend
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        return take_gradient(ctx, grad_loss), None, None, None, None, None, None


# A kernel writing over a graph's tensor is nothing torch.compile can trace: it runs that call eagerly.
@torch.compiler.disable
def _gradient_over_logits(*args):
    return _GradientOverLogits.apply(*args)


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
    reads them; eager only).
    """
    _check_inputs(logits, target, weight, label_smoothing, reduction)
    backend = dispatch.backend_for("cross_entropy", logits.device, logits.dtype, backend=backend)
    if backend == "reference":
        return cross_entropy_reference(logits, target, weight, ignore_index, label_smoothing, reduction)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.to(torch.int64).contiguous()
    if validate and backend == "triton":
        check_target_range_eagerly(target, logits.shape[1], ignore_index)
    with_grad = logits.requires_grad and torch.is_grad_enabled()
    if inplace_grad and with_grad:
        return _gradient_over_logits(logits, target, weight, ignore_index, float(label_smoothing), reduction,
                                     backend)
    loss, _ = _forward_op(logits, target, weight, ignore_index, float(label_smoothing), reduction, backend,
                          with_grad)
    return loss
