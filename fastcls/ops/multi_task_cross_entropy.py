"""Softmax cross-entropy of T classification tasks in one launch: logits[B, sum_t K_t], targets[B, T].

Task t owns the class segment [off_t, off_t + K_t) of every row (off_t = K_0 + ... + K_{t-1}) and target column t,
where -100 (IGNORE_INDEX) marks a missing label. The op returns

    task_loss_sums[t] = sum over the rows r labelled for task t of CE(logits[r, off_t : off_t + K_t], targets[r, t])
    loss              = sum_t task_scale[t] * task_loss_sums[t]

in fp32 (fp64 for fp64 logits). A task with no labelled row adds 0. The loss is differentiable in the logits
(task_scale[t] * (softmax - onehot) on a labelled segment, 0 on a missing label's) and in task_scale (its gradient
is task_loss_sums, e.g. for learned uncertainty weighting); task_loss_sums carries no gradient.

As in `fastcls.ops.cross_entropy` (see its docstring), the kernels write the logits' gradient in the forward pass,
the backward only scales it by the upstream gradient (free when that is exactly 1), and the kernels run inside the
torch.library custom op "fastcls::multi_task_cross_entropy_forward"(logits, targets, task_scale, num_labels,
backend, with_grad) -> (loss, task_loss_sums, grad), so torch.compile traces through it and a CUDA graph captures
it (nothing on the default path reads the device from the host).

Backends (registered below with `fastcls.ops.dispatch`):

- cpp: fp32, bf16 and fp16 logits on CPU; fp64 runs the reference.
- triton: fp32, bf16 and fp16 logits on CUDA (or on CPU under TRITON_INTERPRET=1); fp64 runs the reference.
- reference: PyTorch, fp32 math (fp64 for fp64 logits), differentiated by autograd.

Out-of-range targets (neither -100 nor in [0, K_t)) raise IndexError naming the row and the task. The C++ kernel
checks them before it writes anything; the Triton and reference paths check with one vectorised comparison, which
on CUDA costs a host sync: `validate=False` skips it on the Triton path (a bad label then counts as missing, never
read out of bounds), and it is skipped while torch.compile traces and while a CUDA graph is captured.
"""
import functools
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from fastcls.ops import cpp, dispatch
from fastcls.ops.cross_entropy import take_gradient
from fastcls.ops.library import KernelOp

IGNORE_INDEX = -100

dispatch.register_op("multi_task_cross_entropy", cpp=cpp.CROSS_ENTROPY_DTYPES,
                     triton=(torch.float32, torch.bfloat16, torch.float16))


def check_num_labels(num_labels: Sequence[int], n_classes: int | None = None) -> tuple[int, ...]:
    """num_labels as a tuple of positive ints; ValueError unless it is one, summing to n_classes where given."""
    sizes = tuple(int(k) for k in num_labels)
    if not sizes or any(k < 1 for k in sizes):
        raise ValueError(f"num_labels must list each task's class count (at least 1), got {list(num_labels)}")
    if n_classes is not None and sum(sizes) != n_classes:
        raise ValueError(f"num_labels {list(sizes)} sum to {sum(sizes)}, but the logits have {n_classes} classes")
    return sizes


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, num_labels: Sequence[int],
                  task_scale: torch.Tensor) -> tuple[int, ...]:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, sum(num_labels)], got shape {tuple(logits.shape)}")
    sizes = check_num_labels(num_labels, logits.shape[1])
    if targets.shape != (logits.shape[0], len(sizes)):
        raise ValueError(f"targets must be [B, T] = ({logits.shape[0]}, {len(sizes)}), got shape "
                         f"{tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold class indices (an integer tensor), got {targets.dtype}")
    if task_scale.shape != (len(sizes),) or not task_scale.is_floating_point():
        raise ValueError(f"task_scale must be a floating-point tensor of shape ({len(sizes)},), got "
                         f"{task_scale.dtype} of shape {tuple(task_scale.shape)}")
    for name, tensor in (("targets", targets), ("task_scale", task_scale)):
        if tensor.device != logits.device:
            raise ValueError(f"{name} must be on the logits' device {logits.device}, got {tensor.device}")
    return sizes


@functools.lru_cache(maxsize=64)
def segment_table(num_labels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int64 [2, T] on `device`: each task's first class, then its class count. Built once per head and device, so
    a call made during CUDA graph capture or in a compiled graph copies nothing from the host."""
    offsets = [sum(num_labels[:t]) for t in range(len(num_labels))]
    return torch.tensor([offsets, list(num_labels)], dtype=torch.int64, device=device)


def check_target_range(targets: torch.Tensor, num_labels: tuple[int, ...]) -> None:
    """IndexError naming the first (row, task) whose target is neither -100 nor in [0, K_t)."""
    n_classes = segment_table(num_labels, targets.device)[1]
    bad = ((targets < 0) | (targets >= n_classes)) & (targets != IGNORE_INDEX)
    if bad.any():
        row, task = (int(i) for i in bad.nonzero()[0])
        raise IndexError(f"multi_task_cross_entropy: target {int(targets[row, task])} in row {row} of task {task} "
                         f"is outside [0, {num_labels[task]}) and is not ignore_index ({IGNORE_INDEX})")


def check_target_range_eagerly(targets: torch.Tensor, num_labels: tuple[int, ...]) -> None:
    """check_target_range, except while torch.compile traces or a CUDA graph is captured: there the host cannot
    read the targets, and the kernels count a bad label as missing."""
    if torch.compiler.is_compiling() or (targets.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    check_target_range(targets, num_labels)


def multi_task_cross_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_labels: Sequence[int],
    task_scale: torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, task_loss_sums) in PyTorch, fp32 math (fp64 for fp64 logits), differentiable by autograd; `backend`
    and `validate` are accepted for the same signature and ignored (the targets are always checked)."""
    sizes = _check_inputs(logits, targets, num_labels, task_scale)
    check_target_range_eagerly(targets, sizes)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    sums = []
    for task, segment in enumerate(x.split(sizes, dim=1)):
        target = targets[:, task]
        labelled = target != IGNORE_INDEX
        nll = torch.logsumexp(segment, dim=1) - segment.gather(1, torch.where(labelled, target, 0)[:, None])[:, 0]
        sums.append(torch.where(labelled, nll, 0.0).sum())
    task_loss_sums = torch.stack(sums)
    return (task_loss_sums * task_scale.to(x.dtype)).sum(), task_loss_sums.detach()


def _forward_impl(logits: torch.Tensor, targets: torch.Tensor, task_scale: torch.Tensor, num_labels: list[int],
                  backend: str, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if with_grad else None
    segments = segment_table(tuple(num_labels), logits.device)
    if backend == "triton":
        from fastcls.kernels.multi_task_cross_entropy import (
            multi_task_cross_entropy_triton,
        )

        loss, task_loss_sums = multi_task_cross_entropy_triton(logits, targets, segments, task_scale, IGNORE_INDEX,
                                                               grad)
    else:
        loss, task_loss_sums = cpp.multi_task_cross_entropy(logits, targets, segments, task_scale, IGNORE_INDEX,
                                                            grad)
    return loss, task_loss_sums, grad if with_grad else logits.new_empty(0)


def _forward_fake(logits, targets, task_scale, num_labels, backend, with_grad):
    return (logits.new_empty((), dtype=torch.float32), logits.new_empty((len(num_labels),), dtype=torch.float32),
            logits.new_empty(logits.shape if with_grad else (0,)))


def _setup_forward(ctx, inputs, output):
    _, task_loss_sums, grad = output
    ctx.mark_non_differentiable(task_loss_sums, grad)
    ctx.set_materialize_grads(False)
    ctx.grad, ctx.backend = grad, inputs[4]
    ctx.task_loss_sums, ctx.scale_dtype = task_loss_sums, inputs[2].dtype


def _gradients(ctx, grad_loss):
    grad_logits = grad_scale = None
    if grad_loss is not None:
        if ctx.needs_input_grad[0]:
            grad_logits = take_gradient(ctx, grad_loss)
        if ctx.needs_input_grad[2]:
            grad_scale = (ctx.task_loss_sums * grad_loss).to(ctx.scale_dtype)
    return grad_logits, None, grad_scale, None, None, None


_gradients_once = once_differentiable(_gradients)


def _backward(ctx, grad_loss, _grad_of_sums, _grad_of_grad):
    # as in cross_entropy: once_differentiable's refusal only matters to a backward that builds a graph
    if torch.is_grad_enabled():
        return _gradients_once(ctx, grad_loss)
    return _gradients(ctx, grad_loss)


_forward_op = KernelOp("multi_task_cross_entropy_forward", _forward_impl, _forward_fake).with_autograd(
    _backward, _setup_forward)


def multi_task_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_labels: Sequence[int],
    task_scale: torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, task_loss_sums) of logits [B, sum(num_labels)] against targets [B, T] (-100: missing label), each
    task's summed loss weighted by task_scale [T], on the backend picked by dispatch (see the module docstring).

    `validate=False` skips the target check that costs a host sync on the Triton path.
    """
    sizes = _check_inputs(logits, targets, num_labels, task_scale)
    backend = dispatch.backend_for("multi_task_cross_entropy", logits.device, logits.dtype, backend=backend)
    if backend == "reference":
        return multi_task_cross_entropy_reference(logits, targets, sizes, task_scale)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    targets = targets.to(torch.int64).contiguous()
    if validate and backend == "triton":
        check_target_range_eagerly(targets, sizes)
    with_grad = logits.requires_grad and torch.is_grad_enabled()
    loss, task_loss_sums, _ = _forward_op(logits, targets, task_scale, list(sizes), backend, with_grad)
    return loss, task_loss_sums
