"""Triton kernel for mask-free dropout: out = keep * x * scale over a contiguous tensor.

Draws the same mask as the C++ kernel and the PyTorch reference (see `fastcls.ops.dropout`): element i takes
word i % 4 of Philox4x32-10 at counter offset + i // 4, under a seed and offset given as arguments or read from
a generator's (seed, base counter) device tensor, so that a CUDA graph replays with the tensor's new values. A program covers BLOCK // 4 counters and views its elements as
rows of 4, so each Philox evaluation feeds one row. Math is fp32 whatever the dtype. Offsets are int64, so
tensors past 2^31 elements draw the right bits.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def stream_start(rng_ptr, seed, offset, FROM_TENSOR: tl.constexpr):
    """(key, first counter) of a call: the arguments, or the generator's seed and its base counter + offset."""
    if FROM_TENSOR:
        return tl.load(rng_ptr), tl.load(rng_ptr + 1) + offset
    return seed, offset.to(tl.int64)


# The seed and offset change every call and the threshold with p: specialising on their values (== 1,
# divisibility by 16) would only compile more variants.
@triton.jit(do_not_specialize=["seed", "offset", "threshold"])
def _dropout_kernel(x_ptr, out_ptr, n_elements, rng_ptr, seed, offset, threshold, scale,
                    FROM_TENSOR: tl.constexpr, BLOCK: tl.constexpr):
    key, first_counter = stream_start(rng_ptr, seed, offset, FROM_TENSOR)
    local = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    counters = first_counter + local
    lanes = tl.arange(0, 4)[None, :]
    offsets = local[:, None] * 4 + lanes
    mask = offsets < n_elements
    # fp32 math whatever the dtype; the interpreter computes bf16 wrongly besides (and stores it truncated).
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    # tl.philox with explicit 32-bit counter words is what tl.randint4x(seed, counters) runs for int64 counters
    # from Triton 3.4 on; before that, randint4x ran 64-bit Philox on 64-bit offsets.
    counter_lo = counters.to(tl.uint32)
    zero = counter_lo * 0
    w0, w1, w2, w3 = tl.philox(key, counter_lo, (counters >> 32).to(tl.uint32), zero, zero)
    bits = tl.where(lanes == 0, w0[:, None],
                    tl.where(lanes == 1, w1[:, None], tl.where(lanes == 2, w2[:, None], w3[:, None])))
    # A select rather than a multiply by 0, so that a dropped NaN or infinity becomes 0.
    out = tl.where(bits >= threshold.to(tl.uint32), x * scale, 0.0)
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


def dropout_triton(x: torch.Tensor, rng: torch.Tensor | None, seed: int, offset: int, threshold: int,
                   scale: float) -> torch.Tensor:
    """A new tensor: the elements of contiguous x whose Philox word is >= threshold (0 to 2^32), times scale; the
    others 0. The words are those of key `seed` (0 <= seed < 2^64) from counter `offset` on, or with `rng` (an
    int64 (seed, base counter) tensor on x's device) of key rng[0] from counter rng[1] + offset."""
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got strides {x.stride()} for shape {tuple(x.shape)}")
    out = torch.empty_like(x)
    if threshold == 2**32:  # beyond any 32-bit word: nothing is kept
        return out.zero_()
    n_elements = x.numel()
    _dropout_kernel[(triton.cdiv(n_elements, BLOCK),)](
        x, out, n_elements, x if rng is None else rng, seed, offset, threshold, scale, FROM_TENSOR=rng is not None,
        BLOCK=BLOCK, num_warps=4
    )
    return out
