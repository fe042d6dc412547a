"""A whole BERT-family encoder layer over packed sequences as one autograd node, on the CPU kernels.

The layer's eight ops (the stacked query/key/value product, attention, the output product, dropout + residual +
LayerNorm, the first feed-forward product with its bias and GELU, the second product, dropout + residual +
LayerNorm) each run as their own autograd Function elsewhere (fastcls.ops.linear, varlen_attention,
dropout_add_layer_norm, bias_gelu). On two CPU cores a fine-tuning step of short texts spends about a fifth of its
time around the kernels rather than in them: building and walking ~20 autograd nodes a layer, the wrappers'
checks, views, casts and gradient sums. Here the forward calls the kernels in turn and its backward calls their
backwards in reverse: one node a layer, nothing else changed.

The arithmetic is the separate ops', call for call: the same kernels on the same inputs, the same dropout masks
(each op draws its counters in the same order and number), the same roundings and gradient dtypes, so a step
gives the same bits either way (tests/test_encoder_layer.py). It saves what they save: the bf16 input of each
product, q/k/v (the stacked product's output), the attention's log-sum-exp, GELU's input, and each LayerNorm's
output (or its pre-norm sum where the output cannot stand in for it; fastcls.ops.layer_norm_recovery).

With `cls_index` (the [CLS]-only last layer) the keys and values come from every token and the queries, the output
product, the LayerNorms and the feed-forward block from the [CLS] tokens alone, as `run_layer`'s separate ops
compute them; those ops run the [CLS] rows' products on oneDNN (fewer than fastcls.ops.linear.MIN_ROWS rows), the
node on fastcls's kernels, so the two agree bit for bit where MIN_ROWS lets the separate ops take the kernels too.

In a training step's case (every parameter and the input take gradients, the residual stream fp32, the biases of
one dtype and the LayerNorms' of one, fp32 or bf16), the [CLS]-only layer's too, the forward and the backward each
call the kernels from one C++ function (csrc/encoder_layer.h), with the same arguments in the same order: on two
cores the Python around some twenty kernel calls a layer cost ~0.5 ms a forward and ~0.75 ms a backward, after each
kernel has swept the caches it runs on. Python still draws the masks, packs the weights and allocates what is saved
or returned.

`encoder_layer_applies` says where it runs: bf16 products by fastcls's kernels (fastcls.ops.linear), the packed
attention, LayerNorm and bias-GELU CPU kernels, plain nn.Linear modules with biases, GELU's erf form, gradients
on. Anywhere else the encoder composes the separate ops.
"""
import functools
from typing import NamedTuple

import torch

from fastcls.ops import cpp, dispatch
from fastcls.ops.dropout import MaskSource, keep_threshold, kept_scale, mask_source
from fastcls.ops.dropout_add_layer_norm import _backward as layer_norm_backward
from fastcls.ops.dropout_add_layer_norm import _forward as layer_norm_forward
from fastcls.ops.dropout_add_layer_norm import _out_dtype
from fastcls.ops.layer_norm_recovery import output_stands_in
from fastcls.ops.linear import _packs_of, grad_bias_of, linear_applies, product_bias, weight_grads, weights_apply
from fastcls.ops.library import traced


class LayerSpec(NamedTuple):
    """What the layer's parameters do not say: heads, dropout probabilities (0 when not training), epsilons."""
    heads: int
    attn_dropout: float
    attn_out_dropout: float
    out_dropout: float
    attn_eps: float
    out_eps: float


def encoder_layer_applies(h: torch.Tensor, linears: tuple, norms: tuple, heads: int, dropouts: tuple) -> bool:
    """Whether `encoder_layer` runs for h [T, d], the layer's (query, key, value, attention output, feed-forward
    in, feed-forward out) modules, its two LayerNorms, its head count and its three dropout probabilities."""
    if not torch.is_grad_enabled() or any(type(m) is not torch.nn.Linear or m.bias is None for m in linears):
        return False
    query, key, value, attn_out, ffn_in, ffn_out = linears
    width = h.shape[-1]
    if h.dim() != 2 or width % heads or width // heads > cpp.VARLEN_ATTENTION_MAX_HEAD_DIM or max(dropouts) >= 1:
        return False
    if not (linear_applies(h, [m.weight for m in (query, key, value, attn_out, ffn_in)])
            and weights_apply([ffn_out.weight], ffn_out.weight.shape[1])):
        return False
    # the Linear weights passed linear_applies' checks; their biases and the norms' parameters remain
    if traced(*[m.bias for m in linears], *[t for m in norms for t in (m.weight, m.bias)]) or not all(
            dispatch.takes("dropout_add_layer_norm", "cpp", m.weight.dtype, m.bias.dtype) for m in norms):
        return False
    return all(dispatch.backend_for(op, h.device, torch.bfloat16) == "cpp"
               for op in ("varlen_attention", "dropout_add_layer_norm", "bias_gelu"))


def encoder_layer(h: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int, linears: tuple, norms: tuple,
                  spec: LayerSpec, cls_index: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's output [T, d] for tokens h [T, d] of packed rows (int cu_seqlens [rows + 1], rows at most
    max_len long), where `encoder_layer_applies`; linears and norms as there. With cls_index (each row's first
    token, int64 [rows]), only those tokens' output [rows, d], their queries attending to every key of their row."""
    params = layer_params(linears, norms)
    return _EncoderLayer.apply(h, cu_seqlens.to(torch.int64), cls_index, max_len, spec, _out_dtype(h, h), *params)


def layer_params(linears: tuple, norms: tuple) -> list[torch.Tensor]:
    """A layer's parameters in the order the layer's node takes them: (query, key, value, attention output,
    feed-forward in, feed-forward out) weights and biases, then the LayerNorms' weights and biases."""
    return [t for m in (*linears, *norms) for t in (m.weight, m.bias)]


def _bf16_copy(like: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor | None:
    """Where a LayerNorm's output is not bf16 already, a bf16 tensor shaped as `like` for its rounded copy."""
    return None if out_dtype == torch.bfloat16 else torch.empty(like.shape, dtype=torch.bfloat16)


def _bf16_of(h: torch.Tensor) -> torch.Tensor:
    """h in bf16, contiguous: the copy that the layer which computed h wrote beside it, while h is as it was then
    (a layer's own LayerNorm writes it: no separate pass over h), else a cast."""
    copy = getattr(h, "_fastcls_bf16", None)
    if copy is not None and copy[0] == h._version:
        return copy[1]
    return h.to(torch.bfloat16).contiguous()


def _source(h: torch.Tensor, numel: int, p: float) -> MaskSource:
    return mask_source(h.device, numel, None) if p > 0 else MaskSource(None, 0, 0)


def _norm_saves(weight: torch.Tensor, bias: torch.Tensor) -> str:
    """What a LayerNorm's backward reads: its output, or the pre-norm sum (fastcls.ops.dropout_add_layer_norm)."""
    return "output" if output_stands_in(weight, bias) else "sum"


def _add_product(grad: torch.Tensor, grad_y: torch.Tensor, packed: torch.Tensor) -> None:
    """grad += grad_y times the packed weight, the product rounded to bf16 as the separate op's output is: in the
    product's own pass where grad is fp32 (autocast's residual stream)."""
    if grad.dtype == torch.float32:
        cpp.linear_gemm(grad_y, packed, None, grad.shape[1], add_to=grad)
    else:
        grad.add_(cpp.linear_gemm(grad_y, packed, None, grad.shape[1]))


def _forward_in_one_call(ctx, h, hb, cu, cls_index, max_len, spec, out_dtype, packs, params, run=True,
                         workspace=None, pending=None):
    """A training step's forward (every parameter and the input take gradients, an fp32 residual stream): the
    kernels of _forward_by_ops in one C++ call (csrc/encoder_layer.h), the masks drawn in the same order first.
    With run=False the call is not made: (what it returns, the call for cpp.run_encoder_layer), its outputs
    allocated and the weights' packing calls left in `pending` (fastcls.ops.encoder_stack)."""
    wq, bq, wk, bk, wv, bv, wo, bo, wi, bi, wout, bout, ln1_w, ln1_b, ln2_w, ln2_b = params
    tokens, width = h.shape
    queries = tokens if cls_index is None else len(cls_index)
    probabilities = (spec.attn_dropout, spec.attn_out_dropout, spec.out_dropout)
    numels = (spec.heads * queries * max_len, queries * width, queries * width)
    sources = [_source(h, numel, p) for numel, p in zip(numels, probabilities)]
    saves = _norm_saves(ln1_w, ln1_b), _norm_saves(ln2_w, ln2_b)
    stacks = ((wq, wk, wv),) if cls_index is None else ((wq,), (wk, wv))
    packed = [pack.forward(weights, True, pending) for pack, weights in zip(packs, (*stacks, (wo,), (wi,), (wout,)))]
    dropouts = [(*source.resolved(), keep_threshold(p), kept_scale(p)) for source, p in zip(sources, probabilities)]
    outputs, call = cpp.encoder_layer_forward(h, hb, cu, cls_index, packed, (bq, bk, bv, bo, bi, bout),
                                              (ln1_w, ln1_b, ln2_w, ln2_b), spec.heads, (width // spec.heads) ** -0.5,
                                              (spec.attn_eps, spec.out_eps), dropouts,
                                              (saves[0] == "sum", saves[1] == "sum"), run=False, workspace=workspace)
    if run:
        cpp.run_encoder_layer(call)
    qkv, q, query_in, context, lse, h1, sum1, mean1, rstd1, h1b, f, g_pairs, h2, sum2, mean2, rstd2, h2b = outputs
    if cls_index is None:
        h2._fastcls_bf16 = (h2._version, h2b)
        cu_q, saved_q = cu, (qkv,)
    else:  # as _forward_by_ops saves them: the queries' input, the queries, the keys and values
        cu_q, saved_q = torch.arange(queries + 1), (query_in, q, qkv)
    results = (sources, saves, cu_q, saved_q, context, lse, h1, sum1, mean1, rstd1, h1b, f, g_pairs, h2, sum2, mean2,
               rstd2)
    return results if run else (results, call)


def _forward_by_ops(ctx, h, hb, cu, cls_index, max_len, spec, out_dtype, packs, params):
    """The forward's kernels called one by one: the [CLS]-only layer's, and any case _forward_in_one_call leaves."""
    wq, bq, wk, bk, wv, bv, wo, bo, wi, bi, wout, bout, ln1_w, ln1_b, ln2_w, ln2_b = params
    tokens, width = h.shape
    head_dim = width // spec.heads
    backward = any(ctx.needs_input_grad)
    # the input gradient's packing where it is needed: for the first products, where h takes a gradient
    if cls_index is None:
        qkv = cpp.linear_gemm(hb, packs[0].forward((wq, wk, wv), ctx.needs_input_grad[0]),
                              product_bias(torch.cat([bq, bk, bv])), 3 * width)
        q, k, v = qkv.view(tokens, 3, spec.heads, head_dim).unbind(1)
        residual, cu_q, saved_q = h, cu, (qkv,)
    else:  # the queries, and all that follows attention, of the [CLS] rows alone
        kv = cpp.linear_gemm(hb, packs[1].forward((wk, wv), ctx.needs_input_grad[0]),
                             product_bias(torch.cat([bk, bv])), 2 * width)
        k, v = kv.view(tokens, 2, spec.heads, head_dim).unbind(1)
        residual, query_in = h.index_select(0, cls_index), hb.index_select(0, cls_index)
        q = cpp.linear_gemm(query_in, packs[0].forward((wq,), ctx.needs_input_grad[0]), product_bias(bq), width)
        q, cu_q, saved_q = q.view(-1, spec.heads, head_dim), torch.arange(len(cls_index) + 1), (query_in, q, kv)
    rows = q.shape[0]
    # each op draws its mask's counters in the separate ops' order and number: the same masks
    attn_source = _source(h, spec.heads * rows * max_len, spec.attn_dropout)
    context, lse = cpp.varlen_attention_forward(q, k, v, cu_q, cu, head_dim ** -0.5, *attn_source.resolved(),
                                                keep_threshold(spec.attn_dropout), kept_scale(spec.attn_dropout))
    context = context.view(rows, width)
    a = cpp.linear_gemm(context, packs[-3].forward((wo,), backward), product_bias(bo), width)
    source1, saves1 = _source(h, a.numel(), spec.attn_out_dropout), _norm_saves(ln1_w, ln1_b)
    h1b = _bf16_copy(a, out_dtype)
    h1, sum1, mean1, rstd1 = layer_norm_forward(a, residual, ln1_w, ln1_b, spec.attn_eps, spec.attn_out_dropout,
                                                source1, False, out_dtype, saves1 == "sum", "cpp", h1b)
    h1b = h1 if h1b is None else h1b
    f = cpp.linear_gemm(h1b, packs[-2].forward((wi,), backward), None, wi.shape[0])
    # wout's weight gradient reads g pair-packed: the GELU's pass writes that layout, saved in place of g
    g_pairs = cpp.pairs_empty(*f.shape, cpp.PAIR_PANELS) if ctx.needs_input_grad[16] else None
    g = cpp.bias_gelu_forward(f, product_bias(bi), g_pairs, cpp.PAIR_PANELS)
    o = cpp.linear_gemm(g, packs[-1].forward((wout,), backward), product_bias(bout), width)
    source2, saves2 = _source(h, o.numel(), spec.out_dropout), _norm_saves(ln2_w, ln2_b)
    # the next layer's products read h2 in bf16: a copy from the same pass (not for the [CLS] rows, which end
    # the encoder)
    h2b = _bf16_copy(o, out_dtype) if cls_index is None else None
    h2, sum2, mean2, rstd2 = layer_norm_forward(o, h1, ln2_w, ln2_b, spec.out_eps, spec.out_dropout, source2,
                                                False, out_dtype, saves2 == "sum", "cpp", h2b)
    if h2b is not None:
        h2._fastcls_bf16 = (h2._version, h2b)
    return ((attn_source, source1, source2), (saves1, saves2), cu_q, saved_q, context, lse, h1, sum1, mean1, rstd1,
            h1b, f, g if g_pairs is None else g_pairs, h2, sum2, mean2, rstd2)


def _backward_in_one_call(ctx, grad_h2: torch.Tensor, run: bool = True, workspace=None):
    """The backward of _forward_in_one_call's layer in one C++ call (csrc/encoder_layer.h), for an fp32 gradient.
    With run=False the call is not made: (grad_h as it will be, the call for cpp.run_encoder_layer, a function
    giving the gradients once it ran)."""
    (hb, lse, context, saved1, mean1, rstd1, h1b, f, g_pairs, saved2, mean2, rstd2, cu, _, cls_index, rng, wq, bq, wk,
     bk, wv, bv, wo, bo, wi, bi, wout, bout, ln1_w, ln1_b, ln2_w, ln2_b, *saved_q) = ctx.saved_tensors
    spec, (saves1, saves2), packs = ctx.spec, ctx.saves, ctx.packs
    query_in, q, qkv = saved_q if cls_index is not None else (None, None, *saved_q)
    saved = dict(hb=hb, qkv=qkv, q=q, query_in=query_in, cls_index=cls_index, context=context, h1b=h1b, f=f,
                 g_pairs=g_pairs, lse=lse, saved1=saved1, mean1=mean1, rstd1=rstd1, saved2=saved2, mean2=mean2,
                 rstd2=rstd2, cu=cu, saved1_is_output=saves1 == "output", saved2_is_output=saves2 == "output")
    stacks = ((wq, wk, wv),) if cls_index is None else ((wq,), (wk, wv))
    packed = [pack.backward(weights) for pack, weights in zip(packs, (*stacks, (wo,), (wi,), (wout,)))]
    probabilities = (spec.attn_dropout, spec.attn_out_dropout, spec.out_dropout)
    dropouts = [(*MaskSource(rng, seed, offset).resolved(), keep_threshold(p), kept_scale(p))
                for (seed, offset), p in zip(ctx.sources, probabilities)]
    width, ffn = wq.shape[1], wi.shape[0]
    (grad_h, (qkv_grad, wo_grad, wi_grad, wout_grad), bias_grads, norm_grads), call = cpp.encoder_layer_backward(
        grad_h2.contiguous(), saved, packed, bi, (ln1_w, ln1_b, ln2_w, ln2_b), spec.heads,
        (width // spec.heads) ** -0.5, dropouts, run=False, workspace=workspace)

    def gradients() -> tuple:
        bias = bias_grads.split([width, width, width, width, ffn, width])
        # the weights' gradients in their dtypes, as weight_grads gives them
        weight = [g if g.dtype == w.dtype else g.to(w.dtype)
                  for g, w in zip((*qkv_grad.split([width, width, width]), wo_grad, wi_grad, wout_grad),
                                  (wq, wk, wv, wo, wi, wout))]
        # the parameters' order: each product's weight, then its bias; then the LayerNorms'
        return (grad_h, None, None, None, None, None, *(g for pair in zip(weight, bias) for g in pair),
                *norm_grads.split(width))

    if not run:
        return grad_h, call, gradients
    cpp.run_encoder_layer(call)
    return gradients()


class _EncoderLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, cu, cls_index, max_len, spec, out_dtype, wq, bq, wk, bk, wv, bv, wo, bo, wi, bi, wout, bout,
                ln1_w, ln1_b, ln2_w, ln2_b):
        width = h.shape[1]
        # the first products' stacks: (q, k, v), or (q,) and (k, v) with cls_index; then the output and feed-forward
        stacks = ((wq, wk, wv),) if cls_index is None else ((wq,), (wk, wv))
        packs = [_packs_of(w) for w in (*stacks, (wo,), (wi,), (wout,))]
        hb = _bf16_of(h)
        params = (wq, bq, wk, bk, wv, bv, wo, bo, wi, bi, wout, bout, ln1_w, ln1_b, ln2_w, ln2_b)
        one_call = (cpp.ENCODER_LAYER_BUILT and all(ctx.needs_input_grad[6:])
                    and ctx.needs_input_grad[0] and h.dtype == out_dtype == torch.float32
                    and _one_dtype(bq, bk, bv, bo, bi, bout) and _one_dtype(ln1_w, ln1_b, ln2_w, ln2_b)
                    and wq.shape[0] == wk.shape[0] == wv.shape[0] == width)
        forward = _forward_in_one_call if one_call else _forward_by_ops
        results = forward(ctx, h, hb, cu, cls_index, max_len, spec, out_dtype, packs, params)
        saved, (ctx.spec, ctx.saves, ctx.dtypes, ctx.packs, ctx.sources) = _saves(h, hb, cu, cls_index, spec, packs,
                                                                                  params, results)
        ctx.save_for_backward(*saved)
        ctx.one_call = one_call
        return results[13]

    @staticmethod
    def backward(ctx, grad_h2):
        if ctx.one_call and grad_h2.dtype == torch.float32:
            return _backward_in_one_call(ctx, grad_h2)
        (hb, lse, context, saved1, mean1, rstd1, h1b, f, g_or_pairs, saved2, mean2, rstd2, cu, cu_q, cls_index, rng,
         wq, bq, wk, bk, wv, bv, wo, bo, wi, bi, wout, bout, ln1_w, ln1_b, ln2_w, ln2_b, *saved_q) = ctx.saved_tensors
        spec, (saves1, saves2), (h_dtype, h1_dtype), packs = ctx.spec, ctx.saves, ctx.dtypes, ctx.packs
        attn_source, source1, source2 = (MaskSource(rng, seed, offset) for seed, offset in ctx.sources)
        needs = ctx.needs_input_grad[6:]
        tokens, width = hb.shape
        rows, head_dim = context.shape[0], width // spec.heads
        grad_o, grad_h1, ln2_gw, ln2_gb = layer_norm_backward(
            grad_h2.contiguous(), saved2, saves2 == "output", ln2_w, ln2_b, mean2, rstd2, None, spec.out_dropout,
            source2, False, torch.bfloat16, h1_dtype, "cpp")
        grad_g = cpp.linear_gemm(grad_o, packs[-1].backward((wout,)), None, f.shape[1])
        # g pair-packed where wout takes a gradient (f, of g's shape, stands in for g), else g itself
        (wout_grad,), bout_grad = weight_grads(grad_o, f if needs[10] else g_or_pairs, (wout,), needs[10:11],
                                               bout.dtype if needs[11] else None,
                                               x_pairs=g_or_pairs if needs[10] else None)
        # wi's weight gradient reads grad_f's rows interleaved in pairs: from the GELU backward's own pass
        grad_f_pairs = cpp.pairs_empty(*f.shape, cpp.ROW_PAIRS) if needs[8] else None
        grad_f, in_bias_sums = cpp.bias_gelu_backward(grad_g, f, product_bias(bi), grad_f_pairs, cpp.ROW_PAIRS)
        # h1 feeds the product and the residual: the product's bf16 gradient is added to the residual's
        _add_product(grad_h1, grad_f, packs[-2].backward((wi,)))
        (wi_grad,), _ = weight_grads(grad_f, h1b, (wi,), needs[8:9], grad_y_pairs=grad_f_pairs)

        grad_a, grad_residual, ln1_gw, ln1_gb = layer_norm_backward(
            grad_h1, saved1, saves1 == "output", ln1_w, ln1_b, mean1, rstd1, None, spec.attn_out_dropout, source1,
            False, torch.bfloat16, h_dtype, "cpp")
        grad_context = cpp.linear_gemm(grad_a, packs[-3].backward((wo,)), None, width)
        (wo_grad,), bo_grad = weight_grads(grad_a, context, (wo,), needs[6:7], bo.dtype if needs[7] else None)
        attention = (head_dim ** -0.5, *attn_source.resolved(), keep_threshold(spec.attn_dropout),
                     kept_scale(spec.attn_dropout), grad_context.view(rows, spec.heads, head_dim), lse)
        if cls_index is None:
            (qkv,) = saved_q
            q, k, v = qkv.view(tokens, 3, spec.heads, head_dim).unbind(1)
            grad_qkv = cpp.varlen_attention_backward(q, k, v, cu, cu, *attention, stacked=True).view(tokens, 3 * width)
            grads_qkv, bias_grads = _stack_grads(grad_qkv, hb, (wq, wk, wv), (bq, bk, bv), needs[0:6])
            grad_h = None
            if ctx.needs_input_grad[0]:  # h feeds the product and the residual
                grad_h = grad_residual
                _add_product(grad_h, grad_qkv, packs[0].backward((wq, wk, wv)))
        else:
            query_in, q, kv = saved_q
            q, (k, v) = q.view(rows, spec.heads, head_dim), kv.view(tokens, 2, spec.heads, head_dim).unbind(1)
            grad_q, grad_k, grad_v = cpp.varlen_attention_backward(q, k, v, cu_q, cu, *attention)
            grad_q = grad_q.view(rows, width)
            grad_kv = torch.cat([grad_k.view(tokens, width), grad_v.view(tokens, width)], dim=1)
            (wq_grad,), (bq_grad,) = _stack_grads(grad_q, query_in, (wq,), (bq,), needs[0:2])
            (wk_grad, wv_grad), (bk_grad, bv_grad) = _stack_grads(grad_kv, hb, (wk, wv), (bk, bv), needs[2:6])
            grads_qkv, bias_grads = (wq_grad, wk_grad, wv_grad), (bq_grad, bk_grad, bv_grad)
            grad_h = None
            if ctx.needs_input_grad[0]:
                # the [CLS] rows' query input and residual, then every token's through the keys and values, summed
                # as autograd sums the separate ops' gradients
                _add_product(grad_residual, grad_q, packs[0].backward((wq,)))
                grad_h = cpp.linear_gemm(grad_kv, packs[1].backward((wk, wv)), None, width).to(h_dtype)
                grad_h.index_add_(0, cls_index, grad_residual)
        grads = (grads_qkv[0], bias_grads[0], grads_qkv[1], bias_grads[1], grads_qkv[2], bias_grads[2], wo_grad,
                 bo_grad, wi_grad, grad_bias_of(in_bias_sums, bi.dtype), wout_grad, bout_grad,
                 ln1_gw.to(ln1_w.dtype), ln1_gb.to(ln1_b.dtype), ln2_gw.to(ln2_w.dtype), ln2_gb.to(ln2_b.dtype))
        return grad_h, None, None, None, None, None, *(grad if need else None for grad, need in zip(grads, needs))


def _saves(h, hb, cu, cls_index, spec, packs, params, results) -> tuple[tuple, tuple]:
    """What a layer's forward saves for its backward: the tensors, and (spec, saves, dtypes, packs, sources)."""
    (sources, (saves1, saves2), cu_q, saved_q, context, lse, h1, sum1, mean1, rstd1, h1b, f, g_saved, h2, sum2,
     mean2, rstd2) = results
    rng = next((s.rng for s in sources if s.rng is not None), None)
    # the generator's state is saved like a tensor input, so a backward after its end_step fails loudly rather
    # than redrawing other masks
    tensors = (hb, lse, context, h1 if saves1 == "output" else sum1, mean1, rstd1, h1b, f, g_saved,
               h2 if saves2 == "output" else sum2, mean2, rstd2, cu, cu_q, cls_index, rng, *params, *saved_q)
    return tensors, (spec, (saves1, saves2), (h.dtype, h1.dtype), packs, tuple((s.seed, s.offset) for s in sources))


def _one_dtype(*tensors: torch.Tensor) -> bool:
    """Whether the tensors share one dtype, fp32 or bf16: what cpp.encoder_layer_backward takes of biases and norms."""
    return tensors[0].dtype in (torch.float32, torch.bfloat16) and all(t.dtype == tensors[0].dtype for t in tensors)


def _stack_grads(grad_y, x, weights, biases, needs):
    """The gradients of weights stacked into one product and of their biases, concatenated as the separate op's
    bias is (torch.cat's dtype); needs: (weight, bias) flags for each."""
    bias_dtype = functools.reduce(torch.promote_types, [b.dtype for b in biases]) if any(needs[1::2]) else None
    grads, bias_grad = weight_grads(grad_y, x, weights, needs[0::2], bias_dtype)
    if bias_grad is None:
        return grads, (None,) * len(weights)
    return grads, bias_grad.split([w.shape[0] for w in weights])
