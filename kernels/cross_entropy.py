"""Triton kernels for softmax cross-entropy with class-index targets over logits[N, K].

One program per row. A row of at most MAX_SINGLE_BLOCK classes is loaded once and kept in registers for both
the loss and the gradient; a wider row is walked in BLOCK-wide chunks with an online softmax (running max,
rescaled sum) and read a second time, from L2 where it fits, to write the gradient. Math is fp32 whatever the
logits' dtype; the loss comes out fp32 and the gradient in the logits' dtype, written in the forward (into a new
buffer or over the logits) and scaled by the upstream gradient in the backward by `scale_rows_triton`, which
reads that gradient on the device and leaves the buffer alone when it is exactly 1 (no host sync). A "mean"
reduction's divisor and its reciprocal (the gradient's scale) come from `target_summary_triton`: one launch of
one program over the targets rather than a chain of small tensor ops, each a launch of its own.

Launch arguments that change from call to call (the number of rows) are grid sizes or unspecialised ints, so a
new batch size never compiles a kernel again; what is specialised (the class count and row strides, the options
as constexprs) is fixed for a model.

The options are torch's: class weights w, ignore_index, label smoothing eps (see fastcls/ops/cross_entropy.py
for the formulas). A target outside [0, K) that is not ignore_index is treated as ignored here, never read out
of bounds; `fastcls.ops.cross_entropy` reports it before launching unless told not to.
"""
import torch
import triton
import triton.language as tl

# Rows up to this many classes stay in registers (32 fp32 values per thread at 32 warps).
MAX_SINGLE_BLOCK = 32768
# Chunk width for wider rows.
CHUNK_BLOCK = 4096

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _cast_rounded(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even: the interpreter's bf16 cast truncates, so bf16 is rounded here in
    fp32 bits first (then the cast is exact). NaN stays NaN."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        x = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, x, rounded)
    return x.to(dtype)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, logits_row_stride, target_ptr, weight_ptr, weight_total_ptr, loss_ptr, grad_ptr, grad_row_stride,
    grad_scale_ptr, n_classes, ignore_index, label_smoothing,
    HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, WITH_GRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(target_ptr + row)
    kept = (target != ignore_index) & (target >= 0) & (target < n_classes)
    cols = tl.arange(0, BLOCK)

    # Pass 1: max, sum of exponentials and, for label smoothing, sum_k w_k x_k.
    if SINGLE_BLOCK:
        mask = cols < n_classes
        # The interpreter computes bf16 wrongly, so everything is widened straight after loading.
        x = tl.load(row_logits_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        row_max = tl.max(x, axis=0)
        exps = tl.exp2((x - row_max) * _LOG2E)
        row_sum = tl.sum(exps, axis=0)
        if SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
                weighted_sum = tl.sum(tl.where(mask, x, 0.0) * w, axis=0)
            else:
                weighted_sum = tl.sum(tl.where(mask, x, 0.0), axis=0)
    else:
        row_max = float("-inf")
        row_sum = 0.0
        weighted_sum = 0.0
        for start in range(0, n_classes, BLOCK):
            mask = start + cols < n_classes
            x = tl.load(row_logits_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=0))
            # A chunk (and so far a row) of -inf logits adds 0, not exp(-inf - -inf).
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            chunk_sum = tl.sum(tl.exp2((x - safe_max) * _LOG2E), axis=0)
            row_sum = row_sum * tl.exp2((row_max - safe_max) * _LOG2E) + chunk_sum
            row_max = new_max
            if SMOOTHING:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + start + cols, mask=mask, other=0.0)
                    weighted_sum += tl.sum(tl.where(mask, x, 0.0) * w, axis=0)
                else:
                    weighted_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    log_sum = tl.log(row_sum)
    lse = row_max + log_sum

    safe_target = tl.where(kept, target, 0)
    target_logit = tl.load(row_logits_ptr + safe_target).to(tl.float32)
    # The class weights' total only enters through the smoothing term.
    if HAS_WEIGHT:
        target_weight = tl.load(weight_ptr + safe_target)
        if SMOOTHING:
            weight_total = tl.load(weight_total_ptr)
        else:
            weight_total = 0.0
    else:
        target_weight = 1.0
        weight_total = n_classes * 1.0
    # (max - x_t) + log(sum) keeps a confident row's small loss from cancelling away as lse - x_t would.
    loss = (1.0 - label_smoothing) * target_weight * ((row_max - target_logit) + log_sum)
    if SMOOTHING:
        loss += (label_smoothing / n_classes) * (weight_total * lse - weighted_sum)
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))

    # Pass 2: grad_k = scale * (prob_coef * p_k - [k == t] * target_coef - class_coef * w_k), 0 on ignored rows.
    if WITH_GRAD:
        row_grad_ptr = grad_ptr + row * grad_row_stride
        if HAS_GRAD_SCALE:
            scale = tl.where(kept, tl.load(grad_scale_ptr), 0.0)
        else:
            scale = tl.where(kept, 1.0, 0.0)
        prob_coef = scale * ((1.0 - label_smoothing) * target_weight + (label_smoothing / n_classes) * weight_total)
        target_coef = scale * (1.0 - label_smoothing) * target_weight
        class_coef = scale * (label_smoothing / n_classes)
        if SINGLE_BLOCK:
            grad = exps * (prob_coef / row_sum) - tl.where(cols == target, target_coef, 0.0)
            if SMOOTHING:
                if HAS_WEIGHT:
                    grad -= class_coef * w
                else:
                    grad -= class_coef
            # The -1 goes in before the cast, so a low-precision target gradient is the rounded exact value.
            tl.store(row_grad_ptr + cols, _cast_rounded(grad, grad_ptr.dtype.element_ty), mask=mask)
        else:
            for start in range(0, n_classes, BLOCK):
                mask = start + cols < n_classes
                x = tl.load(row_logits_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                grad = tl.exp2((x - lse) * _LOG2E) * prob_coef - tl.where(start + cols == target, target_coef, 0.0)
                if SMOOTHING:
                    if HAS_WEIGHT:
                        w = tl.load(weight_ptr + start + cols, mask=mask, other=0.0)
                        grad -= class_coef * w
                    else:
                        grad -= class_coef
                tl.store(row_grad_ptr + start + cols, _cast_rounded(grad, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _target_summary_kernel(target_ptr, weight_ptr, summary_ptr, n_rows, n_classes, ignore_index,
                           HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """summary = (divisor, 1 / divisor): the divisor is the sum of w[target] over kept rows (their count without
    weights), or 1 where no row is kept, so that an all-ignored mean is 0."""
    offsets = tl.arange(0, BLOCK)
    kept_rows = tl.zeros([BLOCK], dtype=tl.int32)
    weight_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK):
        rows = start + offsets
        target = tl.load(target_ptr + rows, mask=rows < n_rows, other=ignore_index)
        kept = (target != ignore_index) & (target >= 0) & (target < n_classes)
        kept_rows += kept.to(tl.int32)
        if HAS_WEIGHT:
            weight_sum += tl.load(weight_ptr + tl.where(kept, target, 0), mask=kept, other=0.0)
    n_kept = tl.sum(kept_rows, axis=0)
    if HAS_WEIGHT:
        total = tl.sum(weight_sum, axis=0)
    else:
        total = n_kept.to(tl.float32)
    divisor = tl.where(n_kept > 0, total, 1.0)
    tl.store(summary_ptr, divisor)
    # Correctly rounded, as torch's reciprocal is: a plain division may compile to an approximate one.
    tl.store(summary_ptr + 1, tl.math.div_rn(tl.full((), 1.0, tl.float32), divisor))


@triton.jit
def _scale_rows_kernel(grad_ptr, grad_row_stride, scale_ptr, scale_stride, n_classes, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    # The usual upstream gradient of a loss is exactly 1: then nothing is read or written.
    if scale != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_classes
        ptrs = grad_ptr + row * grad_row_stride + cols
        grad = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, _cast_rounded(grad * scale, grad_ptr.dtype.element_ty), mask=mask)


def _check_layout(logits: torch.Tensor, target: torch.Tensor, grad: torch.Tensor | None) -> None:
    if logits.ndim != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be 2-D with class stride 1, got shape {tuple(logits.shape)} "
                         f"and strides {logits.stride()}")
    if target.shape != logits.shape[:1] or target.dtype != torch.int64 or not target.is_contiguous():
        raise ValueError("target must be a contiguous int64 tensor with one entry per row of logits")
    if grad is not None and (grad.shape != logits.shape or grad.stride(1) != 1 or grad.dtype != logits.dtype):
        raise ValueError("grad must have the logits' shape and dtype, with class stride 1")


def launch_config(n_classes: int, block_size: int | None = None) -> tuple[bool, int, int]:
    """(single block, block width, warps); `block_size` (a power of two) forces chunked rows of that width."""
    if block_size is not None:
        return False, block_size, 8 if block_size >= 2048 else 4
    if n_classes <= MAX_SINGLE_BLOCK:
        block = triton.next_power_of_2(max(n_classes, 16))
        return True, block, min(32, max(4, block // 512))
    return False, CHUNK_BLOCK, 8


def cross_entropy_rows_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    grad: torch.Tensor | None,
    grad_scale: torch.Tensor | None,
    *,
    block_size: int | None = None,
) -> torch.Tensor:
    """Per-row fp32 losses (0 for ignored rows) of logits[N, K]; unless `grad` is None, also writes grad_scale
    times the gradient into it (it may be `logits` itself). `weight`: fp32 class weights [K] or None;
    `grad_scale`: a one-element fp32 device tensor, or None for 1. `block_size` forces chunked rows, which tests
    use."""
    _check_layout(logits, target, grad)
    n_rows, n_classes = logits.shape
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    single, block, num_warps = launch_config(n_classes, block_size)
    smoothing = label_smoothing > 0
    weight_total = weight.sum() if weight is not None and smoothing else None
    _cross_entropy_kernel[(n_rows,)](
        logits, logits.stride(0), target, weight, weight_total, loss_rows, grad,
        0 if grad is None else grad.stride(0), grad_scale, n_classes, ignore_index, label_smoothing,
        HAS_WEIGHT=weight is not None, SMOOTHING=smoothing, WITH_GRAD=grad is not None,
        HAS_GRAD_SCALE=grad_scale is not None, SINGLE_BLOCK=single, BLOCK=block, num_warps=num_warps,
    )
    return loss_rows


# Targets per step of the summary's single program (a few steps for the batches here): fixed, so that the batch
# size specialises nothing.
SUMMARY_BLOCK = 4096


def target_summary_triton(target: torch.Tensor, weight: torch.Tensor | None, n_classes: int,
                          ignore_index: int) -> torch.Tensor:
    """fp32 [divisor, 1 / divisor] of a "mean" over contiguous int64 `target`, on its device: the divisor is the
    sum of `weight` (fp32 [K] or None for all 1) over the kept rows, 1 where none is kept. A target neither
    ignore_index nor in [0, n_classes) counts as ignored, as in the loss kernel."""
    summary = torch.empty(2, dtype=torch.float32, device=target.device)
    _target_summary_kernel[(1,)](target, weight, summary, target.shape[0], n_classes, ignore_index,
                                 HAS_WEIGHT=weight is not None, BLOCK=SUMMARY_BLOCK, num_warps=8)
    return summary


def scale_rows_triton(grad: torch.Tensor, scale: torch.Tensor, *, block_size: int = 4096) -> None:
    """grad[i, :] *= scale (a 0-dim tensor) or scale[i] (one per row), in place; rows whose scale is exactly 1
    are left untouched without a host sync."""
    n_rows, n_classes = grad.shape
    if n_rows == 0:
        return
    scale = scale.reshape(-1)  # may stay a stride-0 view of one value (the upstream gradient of a sum)
    block = min(block_size, triton.next_power_of_2(max(n_classes, 16)))
    _scale_rows_kernel[(n_rows, triton.cdiv(n_classes, block))](
        grad, grad.stride(0), scale, 0 if scale.numel() == 1 else scale.stride(0), n_classes, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
