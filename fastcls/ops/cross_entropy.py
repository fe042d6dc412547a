"""Softmax cross-entropy with class-index targets for a classification head: logits[N, K], target[N].

Same meaning as `torch.nn.functional.cross_entropy(logits, target, ignore_index=..., reduction=...)`, except
that a mean over a batch whose rows are all ignored is 0 rather than NaN. The loss is fp32 (like torch's under
autocast), the gradient has the logits' dtype. Backends (see `fastcls.ops.dispatch`):

- cpp: fp32 and bf16 logits on CPU; other dtypes (fp16, fp64) run the reference.
- triton: fp32, bf16 and fp16 logits on CUDA (or on CPU under TRITON_INTERPRET=1); fp64 runs the reference.
- reference: PyTorch, fp32 math (fp64 for fp64 logits).

Out-of-range targets (neither ignore_index nor in [0, K)) raise IndexError naming the row. The C++ kernel finds
them for free; the Triton and reference paths check with one vectorised comparison, which on CUDA costs a host
sync. `validate=False` skips that check on the Triton path (a bad row then gets a meaningless loss, never an
out-of-bounds read), and it is skipped while torch.compile traces.
"""
import torch

from fastcls.ops import dispatch

REDUCTIONS = ("mean", "sum", "none")

_KERNEL_DTYPES = {
    "cpp": (torch.float32, torch.bfloat16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, K], got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be [N] = {tuple(logits.shape[:1])}, got shape {tuple(target.shape)}")


def _check_targets(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"cross_entropy: target {int(target[row])} in row {row} is outside [0, {n_classes}) "
            f"and is not ignore_index ({ignore_index})"
        )


def _reduce(loss_rows: torch.Tensor, kept: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / kept.sum().clamp_min(1) if reduction == "mean" else total


def cross_entropy_reference(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """PyTorch softmax cross-entropy in fp32 math (fp64 for fp64 logits), differentiable by autograd."""
    _check_inputs(logits, target, reduction)
    if not torch.compiler.is_compiling():
        _check_targets(target, logits.shape[1], ignore_index)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    kept = target != ignore_index
    target_logit = x.gather(1, torch.where(kept, target, 0).long().unsqueeze(1)).squeeze(1)
    loss_rows = torch.where(kept, torch.logsumexp(x, dim=1) - target_logit, 0.0)
    return _reduce(loss_rows, kept, reduction)


def _forward_cpp(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_classes = logits.shape
    loss_rows = torch.empty(n_rows, dtype=torch.float32)
    lse = torch.empty(n_rows, dtype=torch.float32)
    forward = {
        torch.float32: dispatch.cpp_ext.cross_entropy_forward_f32,
        torch.bfloat16: dispatch.cpp_ext.cross_entropy_forward_bf16,
    }[logits.dtype]
    forward(logits.data_ptr(), n_rows, n_classes, logits.stride(0), target.data_ptr(), ignore_index,
            loss_rows.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    return loss_rows, lse


def _backward_cpp(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, lse: torch.Tensor,
                  scale_rows: torch.Tensor) -> torch.Tensor:
    n_rows, n_classes = logits.shape
    grad = torch.empty((n_rows, n_classes), dtype=logits.dtype)
    backward = {
        torch.float32: dispatch.cpp_ext.cross_entropy_backward_f32,
        torch.bfloat16: dispatch.cpp_ext.cross_entropy_backward_bf16,
    }[logits.dtype]
    backward(logits.data_ptr(), n_rows, n_classes, logits.stride(0), target.data_ptr(), ignore_index,
             lse.data_ptr(), scale_rows.data_ptr(), grad.data_ptr(), torch.get_num_threads())
    return grad


class _CrossEntropyFunction(torch.autograd.Function):
    """Kernel-backed cross-entropy; `logits` must have class stride 1 and `target` be contiguous int64."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str, backend: str):
        if backend == "cpp":
            loss_rows, lse = _forward_cpp(logits, target, ignore_index)
        else:
            from fastcls.kernels.cross_entropy import cross_entropy_forward_triton

            loss_rows, lse = cross_entropy_forward_triton(logits, target, ignore_index)
        kept = target != ignore_index
        ctx.save_for_backward(logits, target, lse, kept)
        ctx.ignore_index, ctx.reduction, ctx.backend = ignore_index, reduction, backend
        return _reduce(loss_rows, kept, reduction)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, target, lse, kept = ctx.saved_tensors
        per_row = grad_output.float()
        if ctx.reduction == "mean":
            per_row = per_row / kept.sum().clamp_min(1)
        # Broadcasts the scalar of mean/sum to every row; ignored rows get no gradient.
        scale_rows = torch.where(kept, per_row, 0.0)
        if ctx.backend == "cpp":
            grad = _backward_cpp(logits, target, ctx.ignore_index, lse, scale_rows)
        else:
            from fastcls.kernels.cross_entropy import cross_entropy_backward_triton

            grad = cross_entropy_backward_triton(logits, target, lse, scale_rows)
        return grad, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Softmax cross-entropy of logits[N, K] against class indices target[N], on the backend picked by dispatch.

    Returns a scalar for reduction "mean"/"sum" and per-row losses for "none", in fp32. `validate=False` skips the
    target check that costs a host sync on the Triton path (see the module docstring).
    """
    _check_inputs(logits, target, reduction)
    backend = dispatch.pick_backend(logits.device, backend)
    if backend == "reference" or logits.dtype not in _KERNEL_DTYPES[backend]:
        return cross_entropy_reference(logits, target, ignore_index, reduction)
    if backend == "triton" and validate and not torch.compiler.is_compiling():
        _check_targets(target, logits.shape[1], ignore_index)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.to(torch.int64).contiguous()
    return _CrossEntropyFunction.apply(logits, target, ignore_index, reduction, backend)
