"""Triton kernels for softmax cross-entropy with class-index targets over logits[N, K].

One program per row walks K in BLOCK-wide chunks with an online softmax (running max, rescaled sum), so a row of
any width is read once in the forward and once in the backward. Math is fp32 whatever the logits' dtype; the loss
and logsumexp come out fp32 and the gradient in the logits' dtype.

These kernels do not check targets: a target outside [0, K) that is not ignore_index gives a meaningless loss for
its row (never an out-of-bounds read). `fastcls.ops.cross_entropy` validates targets before launching.
"""
import torch
import triton
import triton.language as tl

# Widest chunk a program loads at once; wider rows loop. 4096 fp32 keeps 16 elements per thread at 8 warps.
MAX_BLOCK = 4096

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _cross_entropy_forward_kernel(
    logits_ptr, logits_row_stride, target_ptr, loss_ptr, lse_ptr, n_classes, ignore_index, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    row_logits_ptr = logits_ptr + row.to(tl.int64) * logits_row_stride
    cols = tl.arange(0, BLOCK)
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_classes, BLOCK):
        mask = start + cols < n_classes
        # The interpreter computes bf16 wrongly, so everything is widened straight after loading.
        x = tl.load(row_logits_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        chunk_sum = tl.sum(tl.exp2((x - new_max) * _LOG2E), axis=0)
        running_sum = running_sum * tl.exp2((running_max - new_max) * _LOG2E) + chunk_sum
        running_max = new_max
    log_sum = tl.log(running_sum)

    target = tl.load(target_ptr + row)
    target_valid = (target >= 0) & (target < n_classes)
    target_logit = tl.load(row_logits_ptr + target, mask=target_valid, other=0.0).to(tl.float32)
    # (max - x_t) + log(sum) keeps a confident row's small loss from cancelling away as lse - x_t would.
    loss = (running_max - target_logit) + log_sum
    tl.store(loss_ptr + row, tl.where(target == ignore_index, 0.0, loss))
    tl.store(lse_ptr + row, running_max + log_sum)


@triton.jit
def _cross_entropy_backward_kernel(
    logits_ptr, logits_row_stride, target_ptr, lse_ptr, scale_ptr, grad_ptr, n_classes, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    row_logits_ptr = logits_ptr + row.to(tl.int64) * logits_row_stride
    row_grad_ptr = grad_ptr + row.to(tl.int64) * n_classes
    target = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_classes, BLOCK):
        mask = start + cols < n_classes
        x = tl.load(row_logits_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
        prob = tl.exp2((x - lse) * _LOG2E)
        # The -1 goes in before the cast, so a low-precision target gradient is the rounded exact value.
        grad = scale * (prob - tl.where(start + cols == target, 1.0, 0.0))
        tl.store(row_grad_ptr + start + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_classes: int, block_size: int | None) -> tuple[int, int]:
    block = block_size or min(triton.next_power_of_2(max(n_classes, 16)), MAX_BLOCK)
    return block, 8 if block >= 2048 else 4


def _check_layout(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with class stride 1, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    if target.shape != logits.shape[:1] or target.dtype != torch.int64 or not target.is_contiguous():
        raise ValueError("target must be a contiguous int64 tensor with one entry per row of logits")


def cross_entropy_forward_triton(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, *, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (0 for ignored rows) and logsumexp, both fp32, of logits[N, K] with class stride 1.

    `block_size` (a power of two) overrides the chunk width, which tests use to make small rows loop.
    """
    _check_layout(logits, target)
    n_rows, n_classes = logits.shape
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss_rows)
    block, num_warps = _launch_config(n_classes, block_size)
    _cross_entropy_forward_kernel[(n_rows,)](
        logits, logits.stride(0), target, loss_rows, lse, n_classes, ignore_index, BLOCK=block, num_warps=num_warps
    )
    return loss_rows, lse


def cross_entropy_backward_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    scale_rows: torch.Tensor,
    *,
    block_size: int | None = None,
) -> torch.Tensor:
    """Gradient w.r.t. logits[N, K], as a new contiguous tensor of the logits' dtype.

    grad[i, k] = scale_rows[i] * (softmax(logits[i])[k] - [k == target[i]]), with `lse` from the forward and
    `scale_rows` the fp32 per-row upstream gradient, which must be 0 on ignored rows (that zeroes them here).
    """
    _check_layout(logits, target)
    n_rows, n_classes = logits.shape
    grad = torch.empty((n_rows, n_classes), dtype=logits.dtype, device=logits.device)
    block, num_warps = _launch_config(n_classes, block_size)
    _cross_entropy_backward_kernel[(n_rows,)](
        logits, logits.stride(0), target, lse, scale_rows, grad, n_classes, BLOCK=block, num_warps=num_warps
    )
    return grad
