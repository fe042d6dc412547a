"""y = x W^T + b in bf16 on CPUs with AVX-512 BF16: fastcls's own matrix products for the encoder's Linear layers,
forward and backward (csrc/linear_bf16.cpp), with each weight packed once per training step.

torch's bf16 products on the CPU (oneDNN) reach this CPU's peak on a shape they have seen, but a fine-tuning step
brings a new token count every batch: oneDNN builds new primitives for each (~13 a step for a 6-layer encoder),
and packs the weight again on every call, which at the tens to hundreds of tokens of short texts costs as much as
the product. Here one register-blocked kernel of `vdpbf16ps` runs any row count without building anything; the
forward's and the input gradient's weight layouts are packed from one read of the weight and reused by the
step's calls; the weight gradient packs x and dy on the fly (`dy` interleaved by row pairs, not transposed).

A pack is rebuilt when a weight's storage or version changes (torch's in-place ops and FusedAdamW's update bump
the version) and at every forward pass of the encoder (`new_forward_pass`, which it calls, with or without
gradients): weights whose contents change behind their version counter (a write through `.data`, FSDP2's
all-gather into a reused buffer) are read afresh by every pass, and a pass's packs serve its backward.

Numerics are those of bf16 autocast's linear: x, W and b rounded to bf16, fp32 accumulation, the output rounded
once to bf16 (the bias added in fp32 before), dW = dy^T x and db = dy summed over rows, each rounded to bf16 and
cast to its parameter's dtype. `weights` may be several weights stacked on their rows (the query, key and value
projections), packed straight from the parameters: no torch.cat of the weights each forward.

Runs where the avx512_bf16 kernels were built and the CPU has them, for bf16 tensors or under CPU bf16 autocast,
eager mode only (torch.compile traces and tensor subclasses see F.linear), with an even reduction length; anywhere
else `linear` is F.linear on the stacked weights.
"""
import functools
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastcls.ops import cpp, dispatch
from fastcls.ops.library import traced

dispatch.register_op("linear", cpp=cpp.LINEAR_DTYPES)

# Fewer rows run F.linear: the packing of the weights (a pass over them each step) outweighs the product there,
# and a row count this small is the [CLS]-only last layer's, the same every step, so oneDNN builds its primitive
# once (benchmarks/bench_linear.py: at 32 rows fastcls takes 1.4x the time of torch's built primitive). In training
# that layer is one autograd node (fastcls.ops.encoder_layer), which runs its [CLS] rows on the kernels all the same:
# there the node's saved overhead outweighs the packing.
MIN_ROWS = 64
_AUTOCAST_DTYPES = (torch.float32, torch.bfloat16)


# Bumped by new_forward_pass(): packs built in an earlier pass are built again, so that a weight whose contents
# changed behind its version counter (`.data`, FSDP2's all-gather into a reused buffer) is never read stale.
_forward_pass = 0


def new_forward_pass() -> None:
    """Mark the start of a forward pass (the encoder calls it once per forward, training or evaluating): its packs
    are built from the weights as they are now, then serve its backward and any recomputation."""
    global _forward_pass
    _forward_pass += 1


def _marks(weights: Sequence[torch.Tensor]) -> tuple:
    return _forward_pass, tuple((w.data_ptr(), w._version, w.dtype, tuple(w.shape)) for w in weights)


class _Packs:
    """A stack of weights packed for the forward and for the input gradient, each built on first use and rebuilt
    when any weight's storage or version has changed."""

    def __init__(self):
        self.forward_marks = self.backward_marks = None
        self.forward_packed = self.backward_packed = None

    def forward(self, weights: Sequence[torch.Tensor], with_backward: bool, pending: list | None = None) -> torch.Tensor:
        """The forward's packing; with_backward, the input gradient's too, from the same read of the weights. With
        `pending`, the packing's kernel calls go there (cpp.linear_pack_wt) and the packs hold their contents once
        those ran: the caller runs them, or calls `forget` if it cannot."""
        marks = _marks(weights)
        if marks != self.forward_marks:
            both = with_backward and marks != self.backward_marks
            self.forward_packed, pairs = cpp.linear_pack_wt(weights, with_pairs=both, pending=pending)
            self.forward_marks = marks
            if both:
                self.backward_packed, self.backward_marks = pairs, marks
        return self.forward_packed

    def forget(self) -> None:
        """Build both packs again when next asked (their pending calls did not run)."""
        self.forward_marks = self.backward_marks = None

    def backward(self, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        marks = _marks(weights)
        if marks != self.backward_marks:
            self.backward_packed, self.backward_marks = cpp.linear_pack_pairs(weights), marks
        return self.backward_packed


# the ids of a stack's weights -> (weak references to them, the stack's packs); an entry goes when any of its
# weights dies. A plain dict: a WeakIdKeyDictionary lookup builds a weak reference each time, and this runs for
# every product of every step.
_PACKS: dict[tuple[int, ...], tuple[list, _Packs]] = {}


def _packs_of(weights: Sequence[torch.Tensor]) -> _Packs:
    key = tuple(map(id, weights))
    entry = _PACKS.get(key)
    # the weights by reference: a new tensor at a dead one's id never inherits its packs
    if entry is None or any(ref() is not w for ref, w in zip(entry[0], weights)):
        forget = functools.partial(_forget_packs, key)
        entry = _PACKS[key] = ([weakref.ref(w, forget) for w in weights], _Packs())
    return entry[1]


def _forget_packs(key: tuple[int, ...], dead: weakref.ref) -> None:
    entry = _PACKS.get(key)
    if entry is not None and any(ref is dead for ref in entry[0]):  # not a newer entry at the same ids
        del _PACKS[key]


def product_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias as the kernel adds it: rounded to bf16 as autocast's linear takes it, in fp32."""
    return None if bias is None else bias.to(torch.bfloat16).float()


def grad_bias_of(sums: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bias gradient from grad_y's fp32 column sums: rounded to bf16 as autocast's is, then to the bias's dtype."""
    return sums.to(torch.bfloat16).to(dtype)


def weight_grads(grad_y: torch.Tensor, x: torch.Tensor, weights: Sequence[torch.Tensor], needs: Sequence[bool],
                 bias_dtype: torch.dtype | None = None, grad_y_pairs: torch.Tensor | None = None,
                 x_pairs: torch.Tensor | None = None) -> tuple[list, torch.Tensor | None]:
    """(each weight's gradient, None where `needs` says not; the bias's, with a bias_dtype) of y = x W^T + b, from
    contiguous bf16 grad_y and x (or their layouts for the product, as cpp.linear_weight_grad takes them). The
    bias's column sums come from the pass that interleaves grad_y for the weights' product, or from a plain sum
    where no weight takes a gradient."""
    if not any(needs):
        sums = grad_y.sum(0, dtype=torch.float32) if bias_dtype is not None else None
        grads = [None] * len(weights)
    else:
        stacked, sums = cpp.linear_weight_grad(grad_y, x, bias_dtype is not None, grad_y_pairs, x_pairs)
        rows = stacked.split([w.shape[0] for w in weights]) if len(weights) > 1 else (stacked,)
        grads = [(g if g.dtype == w.dtype else g.to(w.dtype)) if need else None
                 for g, w, need in zip(rows, weights, needs)]
    return grads, None if sums is None else grad_bias_of(sums, bias_dtype)


class _LinearBf16(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, *weights: torch.Tensor) -> torch.Tensor:
        packs = _packs_of(weights)
        packed = packs.forward(weights, with_backward=ctx.needs_input_grad[0])
        y = cpp.linear_gemm(x, packed, product_bias(bias), sum(w.shape[0] for w in weights))
        ctx.save_for_backward(x, *weights)
        ctx.packs, ctx.bias_dtype = packs, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, *weights = ctx.saved_tensors
        grad_y = grad_y.to(torch.bfloat16).contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = cpp.linear_gemm(grad_y, ctx.packs.backward(weights), None, x.shape[1])
        bias_needed = ctx.bias_dtype is not None and ctx.needs_input_grad[1]
        grad_weights, grad_bias = weight_grads(grad_y, x, weights, ctx.needs_input_grad[2:],
                                               ctx.bias_dtype if bias_needed else None)
        return grad_x, grad_bias, *grad_weights


def linear_applies(x: torch.Tensor, weights: Sequence[torch.Tensor], backend: str | None = None) -> bool:
    """Whether `linear(x, weights)` runs fastcls's kernels (else F.linear): bf16 products (bf16 x and weights, or
    CPU bf16 autocast), CPU tensors, eager mode, at least MIN_ROWS rows of x, and pairs of the reduction: an even
    width (the forward) and even row counts (the input gradient, each weight's rows starting on a pair)."""
    if not cpp.LINEAR_BUILT or x.device.type != "cpu" or x.numel() < MIN_ROWS * x.shape[-1]:
        return False
    if dispatch.backend_for("linear", x.device, torch.bfloat16, backend=backend) != "cpp" or traced(x):
        return False
    dtypes = _product_dtypes()
    return x.dtype in dtypes and weights_apply(weights, x.shape[-1], dtypes)


def _product_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes whose products are bf16 ones: what CPU bf16 autocast casts to bf16 (fp32), or bf16 already;
    anything else keeps F.linear's own handling."""
    if not torch.is_autocast_enabled("cpu"):
        return (torch.bfloat16,)
    return _AUTOCAST_DTYPES if torch.get_autocast_dtype("cpu") == torch.bfloat16 else ()


def weights_apply(weights: Sequence[torch.Tensor], width: int, dtypes: tuple[torch.dtype, ...] | None = None) -> bool:
    """Whether the kernels take `weights` [N_i, width] (CPU, plain tensors, even width and row counts) for an input
    whose rows pass `linear_applies`."""
    dtypes = _product_dtypes() if dtypes is None else dtypes
    return width % 2 == 0 and not traced(*weights) and all(
        w.device.type == "cpu" and w.dim() == 2 and w.shape[1] == width and w.shape[0] % 2 == 0 and w.dtype in dtypes
        for w in weights)


def linear(x: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], bias: torch.Tensor | None = None, *,
           backend: str | None = None) -> torch.Tensor:
    """x [..., K] times the weights [N_i, K] stacked on their rows, plus bias [sum N_i] (or None): F.linear(x,
    torch.cat(weights), bias), by fastcls's bf16 kernels where `linear_applies`."""
    weights = (weights,) if isinstance(weights, torch.Tensor) else tuple(weights)
    if not linear_applies(x, weights, backend):
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
    y = _LinearBf16.apply(rows, bias, *weights)
    return y.view(*x.shape[:-1], y.shape[-1])
