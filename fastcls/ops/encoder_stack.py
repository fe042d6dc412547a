"""A training step's trainable encoder layers as one autograd node: each layer's forward and backward still one C++
call (fastcls.ops.encoder_layer), the Python around them done for every layer before the first kernel runs.

On two CPU cores each layer's Python (its checks, its outputs' allocations, the argument lists, its autograd node)
took ~0.5 ms a forward and ~0.3 ms a backward, two to three times what the same code takes in a loop of its own:
each layer's kernels, a few milliseconds over megabytes of activations and weights, leave the interpreter's code
and data out of the caches. Here the forward allocates and checks every layer's outputs (layer i's output is layer
i + 1's input, known before either runs), draws every mask's counters in the order the layers would, then runs the
kernels back to back, each layer's weight packing right before its layer (so that its packs are in cache for it);
the backward does the same in reverse. The arithmetic is the layers', call for call: the same kernels on the same
inputs, so a step gives the same bits as layer by layer (tests/test_encoder_stack.py).

`encoder_stack_applies` says where: every layer in `encoder_layer_applies`' case with the one-call kernels (fp32
residual stream, every parameter and the input taking gradients, one dtype for the biases and one for the norms).
The encoder (fastcls.models.encoder) runs layer by layer anywhere else, and under activation checkpointing.
"""
from itertools import accumulate
from types import SimpleNamespace

import torch

from fastcls.ops import cpp
from fastcls.ops.dropout_add_layer_norm import _out_dtype
from fastcls.ops.encoder_layer import (_backward_in_one_call, _bf16_of, _forward_in_one_call, _one_dtype, _packs_of,
                                       _saves, encoder_layer_applies)

PARAMS_PER_LAYER = 16  # the six products' weights and biases, the two LayerNorms'


def encoder_stack_applies(h: torch.Tensor, layers: list[tuple]) -> bool:
    """Whether `encoder_stack` runs for h [T, d] and layers of (linears, norms, their layer_params, heads,
    dropouts)."""
    if not cpp.ENCODER_LAYER_BUILT or not h.requires_grad or h.dtype != torch.float32 or not layers:
        return False
    width = h.shape[-1]
    for linears, norms, params, heads, dropouts in layers:
        if not encoder_layer_applies(h, linears, norms, heads, dropouts):
            return False
        if not all(p.requires_grad for p in params) or not (_one_dtype(*params[1:12:2]) and _one_dtype(*params[12:])):
            return False
        if not all(w.shape[0] == width for w in params[0:6:2]):
            return False
    return _out_dtype(h, h) == torch.float32


def encoder_stack(h: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, layers: list[tuple],
                  cls_index: torch.Tensor | None = None) -> torch.Tensor:
    """The layers' output [T, d] for tokens h [T, d] of packed rows, where `encoder_stack_applies`; layers of
    (layer_params, spec: LayerSpec). With cls_index the last layer computes the [CLS] rows' output alone [rows, d],
    as `encoder_layer` does."""
    specs = tuple(spec for _, spec in layers)
    params = [t for layer, _ in layers for t in layer]
    return _EncoderStack.apply(h, cu_seqlens.to(torch.int64), cls_index, max_len, specs, *params)


def _workspace(direction: str, tokens: int, rows: int, width: int, ffns: list[int], cls_last: bool) -> torch.Tensor:
    """One scratch for every layer's call (they run one after the other): the largest any of them takes, for
    layers of feed-forward widths `ffns`, the last one [CLS]-only with cls_last."""
    n = len(ffns)
    return cpp.encoder_layer_scratch(max(
        cpp.encoder_layer_workspace(direction, tokens, rows, width, ffn, cls_last and i == n - 1)
        for i, ffn in enumerate(ffns)))


class _EncoderStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, cu, cls_index, max_len, specs, *params):
        tokens, width = h.shape
        n = len(specs)
        ffns = [params[i * PARAMS_PER_LAYER + 8].shape[0] for i in range(n)]
        workspace = _workspace("forward", tokens, cu.numel() - 1, width, ffns, cls_index is not None)
        calls, saved, metas = [], [], []
        x, xb = h, _bf16_of(h)
        try:
            for i, spec in enumerate(specs):
                layer = params[i * PARAMS_PER_LAYER:(i + 1) * PARAMS_PER_LAYER]
                wq, _, wk, _, wv, _, wo, _, wi, _, wout = layer[:11]
                last_cls = cls_index if i == n - 1 else None
                stacks = ((wq, wk, wv),) if last_cls is None else ((wq,), (wk, wv))
                packs = [_packs_of(w) for w in (*stacks, (wo,), (wi,), (wout,))]
                # each layer's weights packed right before its kernels, while the packs are in cache for them
                calls.append((packs, []))
                results, call = _forward_in_one_call(None, x, xb, cu, last_cls, max_len, spec, torch.float32, packs,
                                                     layer, run=False, workspace=workspace, pending=calls[-1][1])
                tensors, meta = _saves(x, xb, cu, last_cls, spec, packs, layer, results)
                calls[-1] += (call,)
                saved.append(tensors)
                metas.append(meta)
                x = results[13]
                xb = x._fastcls_bf16[1] if last_cls is None else None
            for _, pending, call in calls:
                cpp.run_pending(pending)
                cpp.run_encoder_layer(call)
        except BaseException:
            for packs, *_ in calls:  # packs marked built whose packing may not have run: built again when next asked
                for pack in packs:
                    pack.forget()
            raise
        ctx.save_for_backward(*(t for tensors in saved for t in tensors))
        ctx.counts, ctx.metas, ctx.cls_last = [len(tensors) for tensors in saved], metas, cls_index is not None
        return x

    @staticmethod
    def backward(ctx, grad_out):
        saved, n = ctx.saved_tensors, len(ctx.metas)
        starts = [0, *accumulate(ctx.counts)]  # each layer's first saved tensor
        hb, cu = saved[0], saved[12]  # layer 0's bf16 input and row starts
        ffns = [saved[starts[i] + 7].shape[1] for i in range(n)]  # each layer's saved f [Q, F]
        workspace = _workspace("backward", hb.shape[0], cu.numel() - 1, hb.shape[1], ffns, ctx.cls_last)
        calls, finishes, grad = [], [], grad_out.contiguous()
        for i in reversed(range(n)):
            spec, saves, dtypes, packs, sources = ctx.metas[i]
            layer = SimpleNamespace(saved_tensors=saved[starts[i]:starts[i + 1]], spec=spec, saves=saves, packs=packs,
                                    sources=sources)
            grad, call, gradients = _backward_in_one_call(layer, grad, run=False, workspace=workspace)
            calls.append(call)
            finishes.append(gradients)
        for call in calls:
            cpp.run_encoder_layer(call)
        grads = [gradients() for gradients in reversed(finishes)]  # layer 0 first
        # each layer's gradients past its six non-tensor inputs (h's is the next layer down's grad_h2)
        return (grads[0][0], None, None, None, None, *(g for layer in grads for g in layer[6:]))


__all__ = ["encoder_stack", "encoder_stack_applies"]
