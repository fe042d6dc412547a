"""Attention over packed (unpadded) sequences with mask-free dropout on the probabilities, in one CPU kernel.

`varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_len, p)`: q [Tq, H, D], k and v [Tk, H, D]; row r's queries are
q[cu_seqlens_q[r]:cu_seqlens_q[r + 1]] and attend to that row's keys k[cu_seqlens_k[r]:cu_seqlens_k[r + 1]]
alone; out [Tq, H, D] = dropout(softmax(q k^T * scale)) v. The queries may be fewer than the keys: with [CLS]
pooling the last layer queries from the [CLS] tokens alone (cu_seqlens_q = arange(rows + 1)). q, k and v may be
strided views (the chunks of one stacked projection): the kernel reads them through their strides.

What it saves for the backward: q, k, v (views of a tensor the model keeps anyway) and the fp32 log-sum-exp per
(query, head); the backward recomputes the probabilities from them, flash-attention style, so no [L, L] tensor
and no mask outlives the forward. The padded path it replaces scatters q, k and v into zero-padded
[rows, H, max_len, D] blocks, runs a batched product, masked softmax, dropout and a second product, and gathers
the real tokens back, in about ten ops each way.

Dropout follows `fastcls.ops.dropout`'s scheme over a canonical flat index: the probability of (row r, head h,
query i, key j) has index H * sum_{r' < r} Lq_r' * Lk_r' + (h * Lq_r + i) * Lk_r + j (each row's [H, Lq, Lk] block
after the previous rows'), and is kept iff Philox word index % 4 of counter offset + index // 4 is >=
round(p * 2^32); kept probabilities are scaled by fp32(1 / (1 - p)). The key and offset come from a seed or from
the active `DropoutGenerator` (which a checkpoint's recomputation replays through `recomputed_alike`), so the
backward and any recomputation redraw the very mask, and `keep_mask((H * sum Lq Lk,), p, seed, offset=...)`
reconstructs it. A call takes H * Tq * max_len counters of the generator's stream (a bound of the index that the
shapes give, so that torch.compile's graph takes what eager takes), of which the mask uses the first.

Backends (registered with `fastcls.ops.dispatch`): cpp, fp32 and bf16 on CPU, heads of up to 128, fp32
arithmetic; reference (PyTorch, row by row, differentiated by autograd) for every other device, dtype and head
size. The kernel runs inside the
custom ops "fastcls::varlen_attention_forward" and "fastcls::varlen_attention_backward", so torch.compile traces
through them.
"""
import torch

from fastcls.ops import cpp, dispatch, library
from fastcls.ops.dropout import MaskSource, _as_int64, _check_p, keep_threshold, kept_scale, mask_source, source_mask

dispatch.register_op("varlen_attention", cpp=cpp.VARLEN_ATTENTION_DTYPES)


def _lengths(cu_seqlens: torch.Tensor, tokens: int, name: str) -> list[int]:
    """The row lengths of a cumulative-length vector, checked against the tokens it indexes."""
    bounds = cu_seqlens.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != tokens or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name} must rise from 0 to the {tokens} tokens, got {bounds}")
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _mask_numel(lengths_q: list[int], lengths_k: list[int], heads: int) -> int:
    return heads * sum(lq * lk for lq, lk in zip(lengths_q, lengths_k))


def _reference(q, k, v, lengths_q, lengths_k, p, scale, source):
    compute = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    heads = q.shape[1]
    keep = source_mask((_mask_numel(lengths_q, lengths_k, heads),), p, source, q.device) if p > 0 else None
    outs, q0, k0, first = [], 0, 0, 0
    for lq, lk in zip(lengths_q, lengths_k):
        qr, kr, vr = (t.to(compute).transpose(0, 1) for t in (q[q0:q0 + lq], k[k0:k0 + lk], v[k0:k0 + lk]))
        probs = torch.softmax(qr @ kr.transpose(-1, -2) * scale, dim=-1)  # [H, Lq, Lk]
        if keep is not None:
            kept = keep[first:first + heads * lq * lk].view(heads, lq, lk)
            probs = torch.where(kept, probs * torch.tensor(kept_scale(p), dtype=compute, device=q.device), 0.0)
            first += heads * lq * lk
        outs.append((probs @ vr).transpose(0, 1))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs).to(q.dtype) if outs else q.new_empty(q.shape)


def varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, p, *, scale=None, seed=0):
    """The same attention from torch ops, row by row, with the kernel's mask, differentiable by autograd; `seed`
    is an int (taken modulo 2^64) or a `MaskSource`."""
    _check_p(p)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    source = seed if isinstance(seed, MaskSource) else MaskSource(None, _as_int64(seed), 0)
    return _reference(q, k, v, _lengths(cu_seqlens_q, q.shape[0], "cu_seqlens_q"),
                      _lengths(cu_seqlens_k, k.shape[0], "cu_seqlens_k"), p, scale, source)


# Custom ops --------------------------------------------------------------------------------------------------------


def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, scale: float, p: float, rng: torch.Tensor | None, seed: int,
                  offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    key, first_counter = MaskSource(rng, seed, offset).resolved()
    return cpp.varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, key, first_counter,
                                        keep_threshold(p), kept_scale(p))


def _forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, p, rng, seed, offset):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:2], dtype=torch.float32)


def _backward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, scale: float, p: float, rng: torch.Tensor | None, seed: int,
                   offset: int, grad_out: torch.Tensor,
                   lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key, first_counter = MaskSource(rng, seed, offset).resolved()
    return cpp.varlen_attention_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, key, first_counter,
                                         keep_threshold(p), kept_scale(p), grad_out, lse)


def _backward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, p, rng, seed, offset, grad_out, lse):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_forward(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, ctx.scale, ctx.p, rng, ctx.seed, ctx.offset = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    # the generator's state is saved like a tensor input, so a backward after its end_step fails loudly rather
    # than redrawing another mask
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, lse, rng)


def _backward_of_forward(ctx, grad_out, _grad_lse):
    q, k, v, cu_seqlens_q, cu_seqlens_k, lse, rng = ctx.saved_tensors
    grads = _backward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, ctx.scale, ctx.p, rng, ctx.seed, ctx.offset,
                         grad_out.to(q.dtype).contiguous(), lse)
    return *grads, None, None, None, None, None, None, None


_backward_op = library.KernelOp("varlen_attention_backward", _backward_impl, _backward_fake)
_forward_op = library.KernelOp("varlen_attention_forward", _forward_impl, _forward_fake).with_autograd(
    _backward_of_forward, _setup_forward)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_len, p=0.0, *, scale=None, training=True, seed=None,
                     backend=None):
    """softmax(q k^T * scale) v within each packed row, dropout p on the probabilities (see the module docstring).

    q [Tq, H, D], k and v [Tk, H, D] (any token and head strides); cu_seqlens_q and cu_seqlens_k [rows + 1] (any
    integer dtype, on the CPU); max_len: at least the longest row of keys. Returns [Tq, H, D] in q's dtype.
    `seed` (any int, taken modulo 2^64) fixes the mask; by default the active `DropoutGenerator` draws it, or else
    each call a fresh seed."""
    _check_p(p)
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q must be [Tq, H, D] and k, v [Tk, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    p = float(p) if training else 0.0
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = dispatch.backend_for("varlen_attention", q.device, q.dtype, k.dtype, v.dtype, backend=backend)
    kernel_runs = backend == "cpp" and len({q.dtype, k.dtype, v.dtype}) == 1 and all(
        t.stride(-1) == 1 for t in (q, k, v)) and q.shape[-1] <= cpp.VARLEN_ATTENTION_MAX_HEAD_DIM
    # reading the lengths would stop a trace, and the kernel reads them itself
    if not (kernel_runs and library.traced(q, k, v, cu_seqlens_q, cu_seqlens_k)):
        lengths_q = _lengths(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
        lengths_k = _lengths(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
        if len(lengths_q) != len(lengths_k) or max(lengths_k, default=0) > max_len:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have as many rows ({len(lengths_q)} and "
                             f"{len(lengths_k)}) and no row of keys be longer than max_len {max_len}")
    # The counters a call takes follow from the shapes alone (H * Tq * max_len bounds H * sum Lq * Lk), so that a
    # compiled graph takes the ones eager would.
    source = mask_source(q.device, q.shape[1] * q.shape[0] * max_len, seed) if p > 0 else MaskSource(None, 0, 0)
    if not kernel_runs:
        return _reference(q, k, v, lengths_q, lengths_k, p, scale, source)
    out, _ = _forward_op(q, k, v, cu_seqlens_q.to(torch.int64), cu_seqlens_k.to(torch.int64), scale, p,
                         source.rng, source.seed, source.offset)
    return out
