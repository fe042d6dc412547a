"""Triton kernels for dropout + residual add + LayerNorm, and LayerNorm + dropout, with no mask in memory.

The mask is `fastcls.ops.dropout`'s (element i of the flat [N, H] tensor takes word i % 4 of Philox4x32-10 at
counter offset + i // 4, the key and offset given as arguments or read from a generator's device tensor). A row is held as a [BLOCK_C, 4] tile of columns c * 4 + lane, so the same register holds the
same column in every row (the weight and bias gradients accumulate per register). Where H % 4 == 0 every row
starts on a counter, and one Philox evaluation serves the 4 lanes of a tile row; otherwise each element runs
Philox on its own counter and keeps its word (4x the integer work, for odd hidden sizes only).

Forward: one row per program. Backward: a fixed number of programs, each over a contiguous range of rows,
accumulating the weight and bias gradients in fp32 registers and writing them once to a [2, programs, H] fp32
partial buffer that the caller sums. All math is fp32; offsets are int64.
"""
import functools

import torch
import triton
import triton.language as tl

from fastcls.kernels.dropout import stream_start


@triton.jit
def _keep(key, first_counter, threshold, row_start, cols, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    """Keep bits of the elements at row_start + cols, cols being the [BLOCK_C, 4] tile c * 4 + lane."""
    lanes = tl.arange(0, 4)[None, :]
    if ALIGNED:
        counters = first_counter + row_start // 4 + tl.arange(0, BLOCK_C)[:, None].to(tl.int64)
        words_lane = lanes
    else:
        offsets = row_start + cols
        counters = first_counter + (offsets >> 2)
        words_lane = (offsets & 3).to(tl.int32)
    counter_lo = counters.to(tl.uint32)
    zero = counter_lo * 0
    # tl.philox with explicit 32-bit counter words is what tl.randint4x(seed, counters) runs for int64 counters
    w0, w1, w2, w3 = tl.philox(key, counter_lo, (counters >> 32).to(tl.uint32), zero, zero)
    bits = tl.where(words_lane == 0, w0, tl.where(words_lane == 1, w1, tl.where(words_lane == 2, w2, w3)))
    return bits >= threshold.to(tl.uint32)


@triton.jit(do_not_specialize=["seed", "offset", "threshold"])
def _forward_kernel(x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, sum_ptr, mean_ptr, rstd_ptr, n_cols, eps,
                    rng_ptr, seed, offset, threshold, scale, HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr,
                    DROPOUT: tl.constexpr, DROPOUT_AFTER: tl.constexpr, FROM_TENSOR: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)[:, None] * 4 + tl.arange(0, 4)[None, :]
    valid = cols < n_cols
    row_start = row * n_cols
    offsets = row_start + cols
    summed = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    if DROPOUT:
        key, first_counter = stream_start(rng_ptr, seed, offset, FROM_TENSOR)
        keep = _keep(key, first_counter, threshold, row_start, cols, ALIGNED, BLOCK_C)
    if DROPOUT and not DROPOUT_AFTER:
        # a select rather than a multiply by 0, so that a dropped NaN or infinity becomes 0
        summed = tl.where(keep, summed * scale, 0.0)
    if HAS_RESIDUAL:
        summed += tl.load(residual_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    if STORE_SUM:
        tl.store(sum_ptr + offsets, summed.to(sum_ptr.dtype.element_ty), mask=valid)
    mean = tl.sum(tl.sum(summed, axis=1), axis=0) / n_cols
    centred = tl.where(valid, summed - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(centred * centred, axis=1), axis=0) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    y = centred * rstd * weight + bias
    if DROPOUT and DROPOUT_AFTER:
        y = tl.where(keep, y * scale, 0.0)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=valid)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit(do_not_specialize=["seed", "offset", "threshold"])
def _backward_kernel(grad_out_ptr, saved_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, grad_sum_ptr, grad_x_ptr,
                     grad_residual_ptr, partial_ptr, n_rows, n_cols, rows_per_program, rng_ptr, seed, offset,
                     threshold, scale, SAVED_IS_OUTPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     HAS_GRAD_SUM: tl.constexpr, DROPOUT: tl.constexpr, DROPOUT_AFTER: tl.constexpr,
                     FROM_TENSOR: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)[:, None] * 4 + tl.arange(0, 4)[None, :]
    valid = cols < n_cols
    weight = tl.load(weight_ptr + cols, mask=valid, other=1.0).to(tl.float32)
    if SAVED_IS_OUTPUT:
        bias = tl.load(bias_ptr + cols, mask=valid, other=0.0).to(tl.float32)
    grad_weight = tl.zeros([BLOCK_C, 4], dtype=tl.float32)
    grad_bias = tl.zeros([BLOCK_C, 4], dtype=tl.float32)
    if DROPOUT:
        key, first_counter = stream_start(rng_ptr, seed, offset, FROM_TENSOR)
    first_row = program.to(tl.int64) * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    for row in range(first_row, last_row):
        row_start = row * n_cols
        offsets = row_start + cols
        dy = tl.load(grad_out_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = _keep(key, first_counter, threshold, row_start, cols, ALIGNED, BLOCK_C)
        if DROPOUT and DROPOUT_AFTER:
            dy = tl.where(keep, dy * scale, 0.0)
        rstd = tl.load(rstd_ptr + row)
        saved = tl.load(saved_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if SAVED_IS_OUTPUT:
            xhat = tl.where(valid, (saved - bias) / weight, 0.0)
        else:
            mean = tl.load(mean_ptr + row)
            xhat = tl.where(valid, (saved - mean) * rstd, 0.0)
        grad_weight += dy * xhat
        grad_bias += dy
        g = dy * weight
        mean_g_xhat = tl.sum(tl.sum(g * xhat, axis=1), axis=0) / n_cols
        mean_g = tl.sum(tl.sum(g, axis=1), axis=0) / n_cols
        grad_summed = (g - mean_g - xhat * mean_g_xhat) * rstd
        if HAS_GRAD_SUM:
            grad_summed += tl.load(grad_sum_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            tl.store(grad_residual_ptr + offsets, grad_summed.to(grad_residual_ptr.dtype.element_ty), mask=valid)
        grad_x = grad_summed
        if DROPOUT and not DROPOUT_AFTER:
            grad_x = tl.where(keep, grad_x * scale, 0.0)
        tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=valid)
    partial = partial_ptr + program.to(tl.int64) * n_cols + cols
    tl.store(partial, grad_weight, mask=valid)
    tl.store(partial + tl.num_programs(0).to(tl.int64) * n_cols, grad_bias, mask=valid)


def _block_c(n_cols: int) -> int:
    return triton.next_power_of_2(triton.cdiv(n_cols, 4))


def _num_warps(n_cols: int) -> int:
    return min(16, max(1, triton.next_power_of_2(n_cols) // 256))


def layer_norm_forward_triton(x, residual, weight, bias, out, summed, mean, rstd, eps, rng, seed, offset, threshold,
                              scale, dropout_after):
    """Fill out [N, H] (and summed, mean, rstd) from contiguous x [N, H] and residual (or None); the mask's key and
    first counter are (seed, offset), or (rng[0], rng[1] + offset) for a generator's state tensor `rng`."""
    n_rows, n_cols = x.shape
    _forward_kernel[(n_rows,)](
        x, residual if residual is not None else x, weight, bias, out, summed if summed is not None else out, mean,
        rstd, n_cols, eps, x if rng is None else rng, seed, offset, threshold, scale,
        HAS_RESIDUAL=residual is not None, STORE_SUM=summed is not None, DROPOUT=threshold > 0,
        DROPOUT_AFTER=dropout_after, FROM_TENSOR=rng is not None, ALIGNED=n_cols % 4 == 0, BLOCK_C=_block_c(n_cols),
        num_warps=_num_warps(n_cols),
    )


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _backward_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":  # a property query per call is host time on every backward: asked once
        return min(n_rows, 4 * _multiprocessors(device))
    return min(n_rows, 4)  # the interpreter runs programs one after the other


def layer_norm_backward_triton(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, grad_x,
                               grad_residual, rng, seed, offset, threshold, scale, dropout_after):
    """Fill grad_x (and grad_residual); returns the [2, programs, H] fp32 partial weight and bias gradients."""
    n_rows, n_cols = grad_out.shape
    programs = max(1, _backward_programs(n_rows, grad_out.device))
    partials = torch.empty((2, programs, n_cols), dtype=torch.float32, device=grad_out.device)
    _backward_kernel[(programs,)](
        grad_out, saved, weight, bias, mean, rstd, grad_sum if grad_sum is not None else grad_out, grad_x,
        grad_residual if grad_residual is not None else grad_x, partials, n_rows, n_cols,
        triton.cdiv(n_rows, programs), grad_out if rng is None else rng, seed, offset, threshold, scale,
        SAVED_IS_OUTPUT=saved_is_output, HAS_RESIDUAL=grad_residual is not None, HAS_GRAD_SUM=grad_sum is not None,
        DROPOUT=threshold > 0, DROPOUT_AFTER=dropout_after, FROM_TENSOR=rng is not None, ALIGNED=n_cols % 4 == 0, BLOCK_C=_block_c(n_cols),
        num_warps=min(16, 2 * _num_warps(n_cols)),
    )
    return partials
