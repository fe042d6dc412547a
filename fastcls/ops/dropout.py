"""Dropout that stores no mask: out = keep * x / (1 - p), with keep drawn from a counter-based generator.

Same meaning as `torch.nn.functional.dropout(x, p, training)`, except that a dropped NaN or infinity becomes 0
where torch's multiply by 0 gives NaN. Each element's keep bit is a pure function of (seed, p, index), so the autograd
Function saves only the seed and p, and the backward redraws the very mask of the forward. Every backend draws
the same mask for the same seed and shape:

- Philox4x32-10 keyed by the 64-bit seed (key words: its low and high 32 bits), bit for bit
  `tl.randint4x(seed, counter)` for an int64 counter (counter words: its low and high 32 bits, 0, 0);
- element i of the contiguous tensor (flat row-major index) takes word i % 4 of counter offset + i // 4, so one
  Philox evaluation serves 4 consecutive elements; a plain seed has offset 0;
- it is kept iff that word is >= round(p * 2^32), which drops a fraction within 2^-33 of p (p = 1 drops all);
- kept elements become x * (1 / (1 - p)): the scale rounded to fp32 (fp64 for fp64 tensors), the product
  formed in that precision and rounded once to the tensor's dtype.

Where the seed comes from (`MaskSource`): a seed given to the call; else the active `DropoutGenerator`
(`use_generator`), the training loop's; else a fresh seed drawn from torch's default CPU generator, so that
`torch.manual_seed` makes dropout repeatable. The generator keeps its seed and a base counter in an int64 device
tensor that the kernels read themselves, and hands each call of a step the next free range of counters (a host
int that restarts every step), then moves the base past them on the device at the end of the step
(`DropoutGenerator.end_step`). So a CUDA graph captured from a step replays the masks an eager step would draw,
new ones at every replay, and the host never reads the device.

The op is the custom op "fastcls::dropout" (torch.library, with a fake implementation and autograd), so
torch.compile traces through it and CUDA graphs capture it.

Backends (registered below with `fastcls.ops.dispatch`):

- cpp: fp32 and bf16 on CPU;
- triton: fp32, bf16 and fp16 on CUDA (or on CPU under TRITON_INTERPRET=1);
- reference: PyTorch, differentiated by autograd (which does save the mask).

Dtypes a backend's kernel does not take run the reference's arithmetic inside the mask-free custom op.
"""
import contextlib
from typing import NamedTuple

import torch
from torch import nn

from fastcls.ops import cpp, dispatch
from fastcls.ops.library import KernelOp

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10

_WORD = 0xFFFFFFFF

dispatch.register_op("dropout", cpp=cpp.DROPOUT_DTYPES, triton=(torch.float32, torch.bfloat16, torch.float16))


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


def _as_int64(seed: int) -> int:
    """A seed taken modulo 2^64 as the signed int64 with its bits (what custom-op schemas and int64 tensors hold)."""
    seed %= 2**64
    return seed - 2**64 if seed >= 2**63 else seed


def keep_threshold(p: float) -> int:
    """The smallest Philox word that keeps its element: round(p * 2^32), from 0 (keep all) to 2^32 (drop all)."""
    return round(p * 2**32)


def kept_scale(p: float) -> float:
    """What kept elements are multiplied by; 0 for p = 1, where nothing is kept."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def draw_seed() -> int:
    """A fresh seed from torch's default CPU generator, so that torch.manual_seed makes dropout repeatable."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


class DropoutGenerator:
    """Graph-safe source of dropout masks on one device (see the module docstring): `state` is the int64 tensor
    (seed, base counter) the kernels read; each call of a step takes the next `counters` from `reserve`."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.state = torch.tensor([_as_int64(seed), 0], dtype=torch.int64).to(device)
        self.step_counters = 0  # counters handed out since the last end_step

    def reserve(self, numel: int) -> int:
        """The first counter (past the base) of a call over `numel` elements, and the range taken for it."""
        offset = self.step_counters
        self.step_counters += (numel + 3) // 4
        return offset

    def end_step(self) -> None:
        """Move the base past every counter this step used: one device op, the same each step of a shape, so a
        captured step does it too."""
        self.state[1:].add_(self.step_counters)
        self.step_counters = 0

    def state_dict(self) -> dict:
        return {"state": self.state.cpu().clone(), "step_counters": self.step_counters}

    def load_state_dict(self, state: dict) -> None:
        self.state.copy_(state["state"])
        self.step_counters = int(state["step_counters"])


_active: DropoutGenerator | None = None


@contextlib.contextmanager
def use_generator(generator: DropoutGenerator | None):
    """Draw the masks of calls without a seed on the generator's device from `generator` inside the block."""
    global _active
    previous, _active = _active, generator
    try:
        yield generator
    finally:
        _active = previous


def active_generator() -> DropoutGenerator | None:
    return _active


def recomputed_alike(fn):
    """`fn`, whose second and later calls (an activation checkpoint's recomputation) draw the counters its first
    call drew, so that they redraw the very masks of the forward."""
    first: list[int] = []

    def call(*args, **kwargs):
        generator = _active
        if generator is None:
            return fn(*args, **kwargs)
        if not first:
            first.append(generator.step_counters)
            return fn(*args, **kwargs)
        resume, generator.step_counters = generator.step_counters, first[0]
        try:
            return fn(*args, **kwargs)
        finally:
            generator.step_counters = resume
    return call


class MaskSource(NamedTuple):
    """Where a call's keep bits come from: key `seed` and first counter `offset`, or with `rng` (a generator's
    state tensor) key rng[0] and first counter rng[1] + offset."""
    rng: torch.Tensor | None
    seed: int  # signed int64 bits of the 64-bit key
    offset: int

    def resolved(self) -> tuple[int, int]:
        """(key, first counter) as unsigned host ints; reads `rng`, so for CPU tensors only."""
        if self.rng is None:
            return self.seed % 2**64, self.offset % 2**64
        seed, base = self.rng.tolist()
        return seed % 2**64, (base + self.offset) % 2**64


def mask_source(device: torch.device, numel: int, seed: int | None) -> MaskSource:
    """The source of one call's mask over `numel` elements on `device` (see the module docstring)."""
    if seed is not None:
        return MaskSource(None, _as_int64(seed), 0)
    generator = _active
    if generator is not None and generator.state.device == device:
        return MaskSource(generator.state, 0, generator.reserve(numel))
    return MaskSource(None, draw_seed(), 0)


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * multiplier for words a in int64 tensors, without overflowing int64: the
    multiplier goes in as two 16-bit halves."""
    low = a * (multiplier & 0xFFFF)
    mid = a * (multiplier >> 16) + (low >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(seed, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four Philox4x32-10 words of each int64 counter (its 64 bits) under `seed` (an int modulo 2^64, or an
    int64 tensor holding its bits), as int64 tensors of 32-bit values: Triton's tl.randint4x(seed, counter)
    reinterpreted as unsigned."""
    k0, k1 = seed & _WORD, (seed >> 32) & _WORD
    c0, c1 = counter & _WORD, (counter >> 32) & _WORD
    c2 = c3 = torch.zeros_like(counter)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_ROUND_A)
        hi2, lo2 = _mulhilo(c2, PHILOX_ROUND_B)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_KEY_A) & _WORD, (k1 + PHILOX_KEY_B) & _WORD
    return c0, c1, c2, c3


def source_mask(shape, p: float, source: MaskSource, device) -> torch.Tensor:
    """The bool mask of kept elements that every backend applies to a tensor of `shape` for `source`; torch ops
    only (traceable, and no host read of `source.rng`)."""
    numel = torch.Size(shape).numel()
    counters = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device) + source.offset
    seed = source.seed
    if source.rng is not None:
        rng = source.rng.to(device)
        seed, counters = rng[0], counters + rng[1]
    words = torch.stack(philox4x32(seed, counters), dim=1).flatten()[:numel]
    return (words >= keep_threshold(p)).view(shape)


def keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device | str = "cpu", *,
              offset: int = 0) -> torch.Tensor:
    """The bool mask of kept elements that every backend applies to a tensor of `shape` for key `seed` and first
    counter `offset`."""
    return source_mask(shape, p, MaskSource(None, _as_int64(seed), offset), device)


def _reference_apply(x: torch.Tensor, p: float, source: MaskSource) -> torch.Tensor:
    keep = source_mask(x.shape, p, source, x.device)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    scale = torch.tensor(kept_scale(p), dtype=compute_dtype, device=x.device)
    return torch.where(keep, x.to(compute_dtype) * scale, 0.0).to(x.dtype)


def dropout_reference(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """PyTorch dropout with the kernels' mask, differentiable by autograd; `seed` is taken modulo 2^64."""
    _check_p(p)
    return _reference_apply(x, p, MaskSource(None, _as_int64(seed), 0))


# The custom op ----------------------------------------------------------------------------------------------------


def _dropout_impl(x: torch.Tensor, rng: torch.Tensor | None, seed: int, offset: int, p: float,
                  backend: str) -> torch.Tensor:
    """keep * x / (1 - p) for contiguous x, keep from MaskSource(rng, seed, offset) (see the module docstring)."""
    source = MaskSource(rng, seed, offset)
    if not dispatch.takes("dropout", backend, x.dtype):
        return _reference_apply(x, p, source)
    if backend == "cpp":
        key, first_counter = source.resolved()
        return cpp.dropout(x, key, first_counter, keep_threshold(p), kept_scale(p))
    from fastcls.kernels.dropout import dropout_triton

    return dropout_triton(x, rng, seed % 2**64, offset, keep_threshold(p), kept_scale(p))


def _dropout_fake(x, rng, seed, offset, p, backend):
    return torch.empty_like(x)


def _setup_dropout(ctx, inputs, output):
    _, rng, ctx.seed, ctx.offset, ctx.p, ctx.backend = inputs
    # saved like a tensor input, so that a backward after the generator's end_step fails loudly rather than
    # redrawing another mask
    ctx.save_for_backward(rng)


def _dropout_backward(ctx, grad_output):
    # dropout is linear with a fixed mask: its backward is itself, applied to the upstream gradient (and so
    # differentiable any number of times)
    (rng,) = ctx.saved_tensors
    return _dropout_op(grad_output.contiguous(), rng, ctx.seed, ctx.offset, ctx.p, ctx.backend), \
        None, None, None, None, None


_dropout_op = KernelOp("dropout", _dropout_impl, _dropout_fake).with_autograd(_dropout_backward, _setup_dropout)


def dropout(
    x: torch.Tensor, p: float, *, training: bool = True, seed: int | None = None, backend: str | None = None
) -> torch.Tensor:
    """Zero each element of x with probability p and scale the rest by 1 / (1 - p), on the backend picked by
    dispatch.

    Returns x itself when not training or p == 0. `seed` (any int, taken modulo 2^64) fixes the mask; by default
    the active `DropoutGenerator` draws it, or else each call a fresh seed from torch's default CPU generator.
    """
    _check_p(p)
    if not training or p == 0:
        return x
    source = mask_source(x.device, x.numel(), seed)
    backend = dispatch.backend_for("dropout", x.device, backend=backend)
    if backend == "reference":
        return _reference_apply(x, p, source)
    return _dropout_op(x.contiguous(), source.rng, source.seed, source.offset, float(p), backend)


class Dropout(nn.Module):
    """torch.nn.Dropout on fastcls's mask-free dropout; `inplace` is accepted and ignored, since the kernels
    write a new tensor."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        _check_p(p)
        self.p = p
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, training=self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"
