"""Triton kernel for fastcls.optim.FusedAdamW: one launch updates every tensor of a bucket (a param group's
tensors of one device and dtype), read through a table of their addresses.

Table row r (int64, `TABLE_WIDTH` columns, laid out as `fastcls.optim.adamw_table.TABLE_COLUMNS`) holds the
addresses of tensor r's parameter, gradient, moments, optional amsgrad maximum and fp32 master copy, its step count
(an fp32 scalar on the device) and its element count. Program i updates BLOCK elements of tensor chunk_tensor[i], from
element chunk_index[i] * BLOCK on; every tensor has at least one program, so even an empty one counts its step.

No host sync: the step count lives on the device, the bias corrections are computed from it once per program
(in fp64, by squaring, so no libdevice pow), the learning rate may be a device tensor that each program loads
(LR_IS_TENSOR: a schedule updating it in place changes no launch argument, so a CUDA graph replays it), and a
GradScaler's found_inf turns every program into a no-op by shrinking its element count to 0. The programs of a
tensor all read the step count before any of them writes it: each takes a ticket (an atomic counter per tensor)
after reading, and the last one writes step + 1 and resets the counter, so the step is written exactly once per
launch, after every read.

Gradient clipping (FusedAdamW's max_grad_norm) takes two launches per bucket: `_grad_sum_of_squares_kernel`
writes each program's sum of squared (unscaled) gradients in fp32 to its slot of a buffer, which the caller sums
for the norm over all buckets; the update then multiplies the gradients in registers by a clip coefficient that
it loads from the device (CLIP), leaving them as they were. The slots, in place of atomics, make the sum the same
from run to run.
"""
import torch
import triton
import triton.language as tl

# Elements per program on CUDA: 16 per thread with 8 warps, enough loads in flight to stream at HBM speed.
CUDA_BLOCK = 4096
CUDA_WARPS = 8
# The interpreter runs programs one by one in numpy: fewer, larger programs are faster, but a bucket of small
# tensors should not pay for a block far beyond its largest tensor.
INTERPRETER_MAX_BLOCK = 1 << 16



@triton.jit
def _power(base, exponent):
    """base ** exponent for a non-negative int32 exponent, by squaring: exact to a few fp64 ulps, no libdevice."""
    result = base * 0 + 1
    while exponent > 0:
        result = tl.where((exponent & 1) != 0, result * base, result)
        base = base * base
        exponent = exponent >> 1
    return result


@triton.jit
def _aligned(base_ptr, address, ELEMENT_BYTES: tl.constexpr):
    """A pointer of base_ptr's type at `address` that Triton knows to be 16-byte aligned (the host checks every
    tensor is, and base_ptr is a 16-byte aligned argument), so that its full blocks load and store 16 bytes per
    instruction. A pointer cast from a loaded integer would carry no alignment at all."""
    offset = (address - base_ptr.to(tl.int64)) // ELEMENT_BYTES
    return base_ptr + tl.multiple_of(offset, 16 // ELEMENT_BYTES)


@triton.jit
def _load(ptr, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    return tl.load(ptr).to(tl.float32)


@triton.jit
def _store(ptr, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty))


@triton.jit
def _adamw_block(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_ptr, master_ptr, offsets, mask,
    decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_bias_correction2_sqrt, grad_scale_ptr,
    clip_coef_ptr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, MASTER: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, CLIP: tl.constexpr, MASKED: tl.constexpr,
):
    grad = _load(grad_ptr + offsets, mask, MASKED)
    if HAS_GRAD_SCALE:
        # like torch's fused AdamW, the gradients are left unscaled, as GradScaler.unscale_ would leave them
        grad = tl.div_rn(grad, tl.load(grad_scale_ptr).to(tl.float32))
        _store(grad_ptr + offsets, grad, mask, MASKED)
    if CLIP:
        grad = grad * tl.load(clip_coef_ptr)
    if MAXIMIZE:
        grad = -grad
    if MASTER:
        weight = _load(master_ptr + offsets, mask, MASKED)
    else:
        weight = _load(param_ptr + offsets, mask, MASKED)
    weight = weight * decay
    exp_avg = _load(exp_avg_ptr + offsets, mask, MASKED)
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = _load(exp_avg_sq_ptr + offsets, mask, MASKED)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    second_moment = exp_avg_sq
    if AMSGRAD:
        second_moment = tl.maximum(_load(max_ptr + offsets, mask, MASKED), exp_avg_sq)
        _store(max_ptr + offsets, second_moment, mask, MASKED)
    denom = tl.sqrt_rn(second_moment) * inv_bias_correction2_sqrt + eps
    weight = weight - step_size * tl.div_rn(exp_avg, denom)
    _store(exp_avg_ptr + offsets, exp_avg, mask, MASKED)
    _store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask, MASKED)
    if MASTER:
        _store(master_ptr + offsets, weight, mask, MASKED)
    _store(param_ptr + offsets, weight, mask, MASKED)


@triton.jit
def _adamw_kernel(
    table_ptr, chunk_tensor_ptr, chunk_index_ptr, tickets_ptr, betas_ptr, param_base, grad_base, moment_base,
    master_base, lr, lr_ptr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, grad_scale_ptr,
    found_inf_ptr, clip_coef_ptr,
    PARAM_BYTES: tl.constexpr, GRAD_BYTES: tl.constexpr, MOMENT_BYTES: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, BIAS_CORRECTION: tl.constexpr, MASTER: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, CLIP: tl.constexpr,
    TABLE_WIDTH: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_tensor_ptr + pid).to(tl.int64)
    chunk = tl.load(chunk_index_ptr + pid).to(tl.int64)
    row = table_ptr + tensor * TABLE_WIDTH
    param_ptr = _aligned(param_base, tl.load(row + 0), PARAM_BYTES)
    grad_ptr = _aligned(grad_base, tl.load(row + 1), GRAD_BYTES)
    exp_avg_ptr = _aligned(moment_base, tl.load(row + 2), MOMENT_BYTES)
    exp_avg_sq_ptr = _aligned(moment_base, tl.load(row + 3), MOMENT_BYTES)
    max_ptr = exp_avg_sq_ptr
    if AMSGRAD:
        max_ptr = _aligned(moment_base, tl.load(row + 4), MOMENT_BYTES)
    master_ptr = master_base
    if MASTER:
        master_ptr = _aligned(master_base, tl.load(row + 5), 4)
    step_ptr = tl.load(row + 6).to(tl.pointer_type(tl.float32))
    numel = tl.load(row + 7)

    step_before = tl.load(step_ptr)
    step_after = step_before + 1.0
    limit = numel
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
        step_after = tl.where(skip, step_before, step_after)
        limit = tl.where(skip, 0, numel)
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    if BIAS_CORRECTION:
        t = step_after.to(tl.int32)
        bias_correction1 = 1.0 - _power(tl.load(betas_ptr), t)
        bias_correction2 = 1.0 - _power(tl.load(betas_ptr + 1), t)
        lr64 = tl.full((), 0.0, tl.float64) + lr  # lr may arrive as a Python float (interpreter) or an fp32
        step_size = (lr64 / bias_correction1).to(tl.float32)
        inv_bias_correction2_sqrt = (1.0 / tl.sqrt(bias_correction2)).to(tl.float32)
    else:
        step_size = lr
        inv_bias_correction2_sqrt = 1.0
    decay = 1.0 - lr * weight_decay

    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    # every block but a tensor's last is full: unmasked, its accesses vectorise
    if (chunk + 1) * BLOCK <= limit:
        _adamw_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_ptr, master_ptr, offsets, None,
                     decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size, inv_bias_correction2_sqrt,
                     grad_scale_ptr, clip_coef_ptr, AMSGRAD, MAXIMIZE, MASTER, HAS_GRAD_SCALE, CLIP, MASKED=False)
    else:
        _adamw_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_ptr, master_ptr, offsets,
                     offsets < limit, decay, one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                     inv_bias_correction2_sqrt, grad_scale_ptr, clip_coef_ptr, AMSGRAD, MAXIMIZE, MASTER,
                     HAS_GRAD_SCALE, CLIP, MASKED=True)

    # the ticket is taken after this program's read of the step count (the atomic orders it), so the last
    # program's write comes after every read
    ticket = tl.atomic_add(tickets_ptr + tensor, 1)
    n_chunks = tl.maximum(tl.cdiv(numel, BLOCK), 1)
    last = ticket == n_chunks - 1
    tl.store(step_ptr, step_after, mask=last)
    tl.store(tickets_ptr + tensor, 0, mask=last)


@triton.jit
def _squares_block(grad_ptr, offsets, mask, grad_scale_ptr, HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    grad = _load(grad_ptr + offsets, mask, MASKED)
    if HAS_GRAD_SCALE:  # divided as the update divides, before squaring: a scaled square could overflow fp32
        grad = tl.div_rn(grad, tl.load(grad_scale_ptr).to(tl.float32))
    return tl.sum(grad * grad, axis=0)


@triton.jit
def _grad_sum_of_squares_kernel(
    table_ptr, chunk_tensor_ptr, chunk_index_ptr, grad_base, grad_scale_ptr, sums_ptr,
    GRAD_BYTES: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, TABLE_WIDTH: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    tensor = tl.load(chunk_tensor_ptr + pid).to(tl.int64)
    chunk = tl.load(chunk_index_ptr + pid).to(tl.int64)
    row = table_ptr + tensor * TABLE_WIDTH
    grad_ptr = _aligned(grad_base, tl.load(row + 1), GRAD_BYTES)
    numel = tl.load(row + 7)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    if (chunk + 1) * BLOCK <= numel:
        total = _squares_block(grad_ptr, offsets, None, grad_scale_ptr, HAS_GRAD_SCALE, MASKED=False)
    else:
        total = _squares_block(grad_ptr, offsets, offsets < numel, grad_scale_ptr, HAS_GRAD_SCALE, MASKED=True)
    tl.store(sums_ptr + pid, total)


def block_size(device: torch.device, max_numel: int) -> int:
    """Elements per program for a bucket whose largest tensor has max_numel elements."""
    if device.type == "cuda":
        return CUDA_BLOCK
    return min(INTERPRETER_MAX_BLOCK, triton.next_power_of_2(max(max_numel, 16)))


def chunk_map(numels: list[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk_tensor, chunk_index) as int32 CPU tensors: for each program, which tensor it updates and which block
    of it; a tensor of 0 elements still gets one program, which counts its step."""
    counts = torch.tensor([max(1, triton.cdiv(n, block)) for n in numels], dtype=torch.int64)
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_index = torch.arange(len(chunk_tensor), dtype=torch.int64) - torch.repeat_interleave(first_chunk, counts)
    return chunk_tensor.to(torch.int32), chunk_index.to(torch.int32)


def adamw_triton(
    table: torch.Tensor, chunk_tensor: torch.Tensor, chunk_index: torch.Tensor, tickets: torch.Tensor,
    betas64: torch.Tensor, bases: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], block: int, *,
    lr: float | torch.Tensor, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
    maximize: bool, bias_correction: bool, master: bool, grad_scale: torch.Tensor | None,
    found_inf: torch.Tensor | None, clip_coef: torch.Tensor | None = None,
) -> None:
    """One launch over the bucket described by `table` (see the module doc). Every address in it must be 16-byte
    aligned; `bases` are 16-byte aligned tensors of the parameter, gradient, moment and master (fp32) dtypes that
    the kernel addresses the table's tensors from. `betas64` holds (beta1, beta2) in fp64 on the device and
    `tickets` one zeroed int32 counter per table row; `clip_coef`, an fp32 scalar on the device, multiplies the
    (unscaled) gradients."""
    param_base, grad_base, moment_base, master_base = bases
    lr_is_tensor = isinstance(lr, torch.Tensor)
    _adamw_kernel[(chunk_tensor.numel(),)](
        table, chunk_tensor, chunk_index, tickets, betas64, param_base, grad_base, moment_base, master_base,
        0.0 if lr_is_tensor else lr, lr if lr_is_tensor else table, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        weight_decay, table if grad_scale is None else grad_scale, table if found_inf is None else found_inf,
        table if clip_coef is None else clip_coef, PARAM_BYTES=param_base.element_size(), GRAD_BYTES=grad_base.element_size(),
        MOMENT_BYTES=moment_base.element_size(),
        AMSGRAD=amsgrad, MAXIMIZE=maximize, BIAS_CORRECTION=bias_correction, MASTER=master,
        LR_IS_TENSOR=lr_is_tensor, HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        CLIP=clip_coef is not None, TABLE_WIDTH=table.shape[1], BLOCK=block, num_warps=CUDA_WARPS,
    )


def grad_sum_of_squares_triton(
    table: torch.Tensor, chunk_tensor: torch.Tensor, chunk_index: torch.Tensor, grad_base: torch.Tensor,
    sums: torch.Tensor, block: int, grad_scale: torch.Tensor | None,
) -> torch.Tensor:
    """The sum of the squares of the bucket's gradients, each divided by grad_scale first, as a 0-dim fp64
    tensor on the device: one fp32 partial sum per program into `sums` (fp32, one slot per program), then their
    sum. `grad_base` is a 16-byte aligned tensor of the gradients' dtype, as for `adamw_triton`."""
    _grad_sum_of_squares_kernel[(chunk_tensor.numel(),)](
        table, chunk_tensor, chunk_index, grad_base, table if grad_scale is None else grad_scale, sums,
        GRAD_BYTES=grad_base.element_size(), HAS_GRAD_SCALE=grad_scale is not None, TABLE_WIDTH=table.shape[1],
        BLOCK=block, num_warps=CUDA_WARPS,
    )
    return sums.sum(dtype=torch.float64)
