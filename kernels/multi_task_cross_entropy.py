"""Triton kernel for the softmax cross-entropy of T tasks over logits[B, sum_t K_t] (see
fastcls/ops/multi_task_cross_entropy.py for the formulas).

One program per (row, task): it reads the task's offset and class count from the segment table, walks the segment
in BLOCK-wide chunks with an online softmax (one chunk for the usual few classes), writes the (row, task) loss and,
with a gradient, reads the segment again (from L1/L2) to write task_scale[t] * (softmax - onehot) there, or zeros
for a missing label. The per-task sums and their weighted total are two small reductions over the [B, T] losses,
in a fixed order (no atomics): the same result at every run.

Launch arguments that change from call to call (the number of rows) are grid sizes, so a new batch size never
compiles the kernel again; what is specialised (the row strides, BLOCK from the widest task) is fixed for a model.
A target outside [0, K_t) that is not the ignore index counts as missing here, never read out of bounds.
"""
import torch
import triton
import triton.language as tl

from fastcls.kernels.cross_entropy import _cast_rounded

# Chunk width for segments wider than this; narrower ones take one chunk of the next power of two.
MAX_BLOCK = 4096

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _multi_task_cross_entropy_kernel(
    logits_ptr, logits_row_stride, targets_ptr, segments_ptr, scale_ptr, loss_ptr, grad_ptr, grad_row_stride,
    ignore_index, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    task = tl.program_id(1)
    n_tasks = tl.num_programs(1)
    offset = tl.load(segments_ptr + task)
    n_classes = tl.load(segments_ptr + n_tasks + task)
    target = tl.load(targets_ptr + row * n_tasks + task)
    kept = (target != ignore_index) & (target >= 0) & (target < n_classes)
    segment_ptr = logits_ptr + row * logits_row_stride + offset
    cols = tl.arange(0, BLOCK)

    # Pass 1: max and sum of exponentials, rescaled chunk by chunk. The interpreter computes bf16 wrongly, so
    # everything is widened straight after loading.
    row_max = float("-inf")
    row_sum = 0.0
    for start in range(0, n_classes, BLOCK):
        mask = start + cols < n_classes
        x = tl.load(segment_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        # a chunk (and so far a segment) of -inf logits adds 0, not exp(-inf - -inf)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp2((row_max - safe_max) * _LOG2E) + tl.sum(tl.exp2((x - safe_max) * _LOG2E), axis=0)
        row_max = new_max
    log_sum = tl.log(row_sum)
    target_logit = tl.load(segment_ptr + tl.where(kept, target, 0)).to(tl.float32)
    # (max - x_t) + log(sum) keeps a confident row's small loss from cancelling away as lse - x_t would
    loss = (row_max - target_logit) + log_sum
    tl.store(loss_ptr + row * n_tasks + task, tl.where(kept, loss, 0.0))

    # Pass 2: grad_k = scale * (p_k - [k == t]), 0 on a missing label's segment.
    if WITH_GRAD:
        scale = tl.where(kept, tl.load(scale_ptr + task), 0.0)
        lse = row_max + log_sum
        grad_segment_ptr = grad_ptr + row * grad_row_stride + offset
        for start in range(0, n_classes, BLOCK):
            mask = start + cols < n_classes
            x = tl.load(segment_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            grad = scale * tl.exp2((x - lse) * _LOG2E) - tl.where(start + cols == target, scale, 0.0)
            # the -1 goes in before the cast, so a low-precision target gradient is the rounded exact value
            tl.store(grad_segment_ptr + start + cols, _cast_rounded(grad, grad_ptr.dtype.element_ty), mask=mask)


def multi_task_cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor,
                                    task_scale: torch.Tensor, ignore_index: int,
                                    grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, task_loss_sums), fp32, of logits [N, sum K_t] (class stride 1) against contiguous int64 targets
    [N, T], the tasks' segments given by `segments` (int64 [2, T] on the logits' device: offsets, then sizes; the
    caller keeps them consistent with the logits); unless `grad` is None, also writes the loss's gradient into it
    (the logits' shape and dtype, class stride 1)."""
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with class stride 1, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    n_rows, n_tasks = targets.shape
    if (n_rows != logits.shape[0] or targets.dtype != torch.int64 or not targets.is_contiguous()
            or segments.shape != (2, n_tasks) or not segments.is_contiguous()):
        raise ValueError("targets must be a contiguous int64 [N, T] and segments a contiguous [2, T]")
    if grad is not None and (grad.shape != logits.shape or grad.stride(1) != 1 or grad.dtype != logits.dtype):
        raise ValueError("grad must have the logits' shape and dtype, with class stride 1")
    scale32 = task_scale.detach().to(torch.float32).contiguous()
    loss_rows = torch.empty((n_rows, n_tasks), dtype=torch.float32, device=logits.device)
    # From the row's width (the widest segment's is on the device): fixed per head, masked lanes are cheap.
    block = min(MAX_BLOCK, triton.next_power_of_2(max(logits.shape[1], 16)))
    if n_rows > 0:
        _multi_task_cross_entropy_kernel[(n_rows, n_tasks)](
            logits, logits.stride(0), targets, segments, scale32, loss_rows, grad,
            0 if grad is None else grad.stride(0), ignore_index, WITH_GRAD=grad is not None, BLOCK=block,
            num_warps=4 if block <= 1024 else 8,
        )
    task_loss_sums = loss_rows.sum(0)
    return torch.dot(task_loss_sums, scale32), task_loss_sums
