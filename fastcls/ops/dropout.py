"""Dropout that stores no mask: out = keep * x / (1 - p), with keep drawn from a counter-based generator.

Same meaning as `torch.nn.functional.dropout(x, p, training)`, except that a dropped NaN or infinity becomes 0
where torch's multiply by 0 gives NaN. Each element's keep bit is a pure function of (seed, p, index), so the autograd
Function saves only the seed and p, and the backward redraws the very mask of the forward. Every backend draws
the same mask for the same seed and shape:

- Philox4x32-10 keyed by the 64-bit seed (key words: its low and high 32 bits), bit for bit
  `tl.randint4x(seed, counter)` for an int64 counter (counter words: its low and high 32 bits, 0, 0);
- element i of the contiguous tensor (flat row-major index) takes word i % 4 of counter i // 4, so one Philox
  evaluation serves 4 consecutive elements;
- it is kept iff that word is >= round(p * 2^32), which drops a fraction within 2^-33 of p (p = 1 drops all);
- kept elements become x * (1 / (1 - p)): the scale rounded to fp32 (fp64 for fp64 tensors), the product
  formed in that precision and rounded once to the tensor's dtype.

Backends (registered below with `fastcls.ops.dispatch`):

- cpp: fp32 and bf16 on CPU;
- triton: fp32, bf16 and fp16 on CUDA (or on CPU under TRITON_INTERPRET=1);
- reference: PyTorch, differentiated by autograd (which does save the mask).

Dtypes a backend's kernel does not take run the reference's arithmetic inside the mask-free Function.
"""
import torch
from torch import nn

from fastcls.ops import cpp, dispatch

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


def keep_threshold(p: float) -> int:
    """The smallest Philox word that keeps its element: round(p * 2^32), from 0 (keep all) to 2^32 (drop all)."""
    return round(p * 2**32)


def kept_scale(p: float) -> float:
    """What kept elements are multiplied by; 0 for p = 1, where nothing is kept."""
    return 1.0 / (1.0 - p) if p < 1.0 else 0.0


def draw_seed() -> int:
    """A fresh seed from torch's default CPU generator, so that torch.manual_seed makes dropout repeatable."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * multiplier for words a in int64 tensors, without overflowing int64: the
    multiplier goes in as two 16-bit halves."""
    low = a * (multiplier & 0xFFFF)
    mid = a * (multiplier >> 16) + (low >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(seed: int, counter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four Philox4x32-10 words of each non-negative int64 counter under `seed` (modulo 2^64), as int64
    tensors of 32-bit values: Triton's tl.randint4x(seed, counter) reinterpreted as unsigned."""
    k0, k1 = seed & _WORD, (seed >> 32) & _WORD
    c0, c1 = counter & _WORD, counter >> 32
    c2 = c3 = torch.zeros_like(counter)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_ROUND_A)
        hi2, lo2 = _mulhilo(c2, PHILOX_ROUND_B)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_KEY_A) & _WORD, (k1 + PHILOX_KEY_B) & _WORD
    return c0, c1, c2, c3


def keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The bool mask of kept elements that every backend applies to a tensor of `shape`."""
    numel = torch.Size(shape).numel()
    counters = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    words = torch.stack(philox4x32(seed, counters), dim=1).flatten()[:numel]
    return (words >= keep_threshold(p)).view(shape)


def dropout_reference(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """PyTorch dropout with the kernels' mask, differentiable by autograd; `seed` is taken modulo 2^64."""
    _check_p(p)
    keep = keep_mask(x.shape, p, seed, x.device)
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    scale = torch.tensor(kept_scale(p), dtype=compute_dtype, device=x.device)
    return torch.where(keep, x.to(compute_dtype) * scale, 0.0).to(x.dtype)


def _apply_mask(x: torch.Tensor, p: float, seed: int, backend: str) -> torch.Tensor:
    if not dispatch.takes("dropout", backend, x.dtype):
        return dropout_reference(x, p, seed)
    if backend == "cpp":
        launch = cpp.dropout
    else:
        from fastcls.kernels.dropout import dropout_triton as launch
    return launch(x, seed, keep_threshold(p), kept_scale(p))


class _DropoutFunction(torch.autograd.Function):
    """Mask-free dropout of a contiguous x. Dropout is linear with a fixed mask, so its backward is itself applied
    to the upstream gradient, which also makes it differentiable any number of times."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int, backend: str):
        ctx.p, ctx.seed, ctx.backend = p, seed, backend
        return _apply_mask(x, p, seed, backend)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_output = grad_output.contiguous()
        if torch.is_grad_enabled():  # create_graph: the backward must itself be differentiable
            return _DropoutFunction.apply(grad_output, ctx.p, ctx.seed, ctx.backend), None, None, None
        # a plain backward (grad mode off) skips a second trip through autograd, per dropout per step
        return _apply_mask(grad_output, ctx.p, ctx.seed, ctx.backend), None, None, None


def dropout(
    x: torch.Tensor, p: float, *, training: bool = True, seed: int | None = None, backend: str | None = None
) -> torch.Tensor:
    """Zero each element of x with probability p and scale the rest by 1 / (1 - p), on the backend picked by
    dispatch.

    Returns x itself when not training or p == 0. `seed` (any int, taken modulo 2^64) fixes the mask; by default
    each call draws a fresh one from torch's default CPU generator.
    """
    _check_p(p)
    if not training or p == 0:
        return x
    seed = draw_seed() if seed is None else seed % 2**64
    backend = dispatch.backend_for("dropout", x.device, backend=backend)
    if backend == "reference":
        return dropout_reference(x, p, seed)
    return _DropoutFunction.apply(x.contiguous(), p, seed, backend)


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
