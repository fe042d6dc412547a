"""Dropout, residual add and LayerNorm in one pass, keeping no dropout mask.

Two orders, the two that end BERT-family blocks:

- `dropout_add_layer_norm(x, residual, weight, bias, p)` = LayerNorm(dropout(x) + residual) (self-attention
  output and feed-forward output blocks; residual=None gives LayerNorm(dropout(x)));
- `layer_norm_dropout(x, weight, bias, p)` = dropout(LayerNorm(x)) (the embeddings).

The keep mask is `fastcls.ops.dropout`'s: element i of the contiguous [N, H] tensor (x for the first order, the
output for the second) takes word i % 4 of Philox4x32-10 at counter offset + i // 4 under the 64-bit key and is
kept iff that word is >= round(p * 2^32); kept elements are scaled by fp32(1 / (1 - p)). Key and offset come from
a seed, or from the active `DropoutGenerator`, whose device tensor the kernels read (graph-safe; see
`fastcls.ops.dropout`). So every backend draws the same mask for the same seed, and
`fastcls.ops.dropout.keep_mask(x.shape, p, seed, offset=...)` reconstructs it. Arithmetic is
fp32 (fp64 for fp64 tensors) whatever the storage dtype, rounded once on the way out; mean and rstd are fp32.

What the backward keeps (the memory design):

- dropout(x) + residual then LayerNorm: torch keeps the byte mask and the pre-norm sum s (N x H each). The
  LayerNorm output y is kept alive anyway by the next layer (its Linear saves its input), so the fused op saves
  y itself, plus the seed and the per-row rstd, and the backward recomputes xhat = (y - bias) / weight (apex's
  memory-efficient LayerNorm): no tensor of the size of x beyond the one the model holds already. That recovery
  fails where weight is 0 (y carries no trace of xhat) and loses precision where |bias| >> |weight| (y's rounding
  error is amplified by |bias / weight|). So it is used only where every column has weight != 0 and |bias| <=
  64 |weight|; otherwise the op saves s and the per-row mean instead, like torch minus the mask. The check
  (`fastcls.ops.layer_norm_recovery`) reads the weight once per weight version (an optimizer step bumps the
  versions; fastcls's FusedAdamW does so too). On CUDA it runs behind the GPU's work, never waiting for it: a
  forward uses the latest finished check, made with a 4x margin so that it holds a step later, and saves s until
  a first check has finished. Inside torch.compile's trace or a CUDA graph capture the op always saves s: an answer
  baked into a graph would outlive the weights it was checked on.
  `return_sum=True` returns s, which the caller keeps alive, so s is saved then.
- LayerNorm then dropout: the output is dropout(y), which lost y where dropped, so the op saves its input x (the
  tensor torch's LayerNorm saves too) with mean and rstd, and not the mask.

The weight and bias gradients are summed per program (Triton) or per thread (C++) into fp32 partial buffers,
then reduced by one small torch sum: no atomics. Offsets are int64.

Output dtype: that of dropout(x) + residual (torch's type promotion), or fp32 under autocast, as torch's
autocast runs layer_norm in fp32. Backends (both orders registered below with `fastcls.ops.dispatch`): triton
(fp32/bf16/fp16 on CUDA, or CPU under TRITON_INTERPRET=1), cpp (fp32 and bf16 on CPU), reference (PyTorch ops
differentiated by autograd, which keeps the mask). Dtypes a backend's kernels do not take, and p = 1, run this
module's own PyTorch arithmetic inside the mask-free op, which saves the same tensors.

The kernels run inside the custom ops "fastcls::layer_norm_forward" and "fastcls::layer_norm_backward"
(torch.library, with fake implementations and the forward's autograd), so torch.compile traces through them and
CUDA graphs capture them; which tensor the backward reads is decided outside, before the forward op runs.
"""
import torch
import torch.nn.functional as F

from fastcls.ops import cpp, dispatch
from fastcls.ops.library import KernelOp
from fastcls.ops.dropout import (
    MaskSource,
    _as_int64,
    _check_p,
    keep_threshold,
    kept_scale,
    mask_source,
    source_mask,
)
from fastcls.ops.layer_norm_recovery import output_stands_in

dispatch.register_op("dropout_add_layer_norm", cpp=cpp.LAYER_NORM_DTYPES,
                     triton=(torch.float32, torch.bfloat16, torch.float16))
dispatch.register_op("layer_norm_dropout", **dispatch.kernel_dtypes("dropout_add_layer_norm"))
# The two orders' names by dropout_after: the same kernels run both.
_OP_BY_ORDER = {False: "dropout_add_layer_norm", True: "layer_norm_dropout"}
MAX_HIDDEN = 8192


# References --------------------------------------------------------------------------------------------------------


def dropout_add_layer_norm_reference(x, residual, weight, bias, p, eps, seed, return_sum=False):
    """LayerNorm(dropout(x) + residual) from torch ops with the kernels' mask, differentiable by autograd; `seed`
    is an int or a `MaskSource`."""
    _check_p(p)
    source = seed if isinstance(seed, MaskSource) else MaskSource(None, _as_int64(seed), 0)
    compute = _compute_dtype(x, residual, weight)
    summed = x.to(compute)
    if p > 0:
        summed = torch.where(source_mask(x.shape, p, source, x.device), summed * _scale(p, compute, x.device), 0.0)
    if residual is not None:
        summed = summed + residual.to(compute)
    out_dtype = _out_dtype(x, residual)
    y = F.layer_norm(summed, (x.shape[-1],), weight.to(compute), bias.to(compute), eps).to(out_dtype)
    return (y, summed.to(out_dtype)) if return_sum else y


def layer_norm_dropout_reference(x, weight, bias, p, eps, seed):
    """dropout(LayerNorm(x)) from torch ops with the kernels' mask, differentiable by autograd; `seed` is an int or
    a `MaskSource`."""
    _check_p(p)
    source = seed if isinstance(seed, MaskSource) else MaskSource(None, _as_int64(seed), 0)
    compute = _compute_dtype(x, None, weight)
    y = F.layer_norm(x.to(compute), (x.shape[-1],), weight.to(compute), bias.to(compute), eps)
    if p > 0:
        y = torch.where(source_mask(x.shape, p, source, x.device), y * _scale(p, compute, x.device), 0.0)
    return y.to(_out_dtype(x, None))


def _compute_dtype(x, residual, weight):
    wide = any(t is not None and t.dtype == torch.float64 for t in (x, residual, weight))
    return torch.float64 if wide else torch.float32


def _out_dtype(x, residual):
    if torch.is_autocast_enabled(x.device.type):
        return torch.float32
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _scale(p, dtype, device):
    return torch.tensor(kept_scale(p), dtype=dtype, device=device)


# The same arithmetic as the kernels, in torch: for dtypes or cases the kernels do not take -------------------------


def _forward_math(x, residual, weight, bias, eps, p, source, dropout_after, out_dtype, keep_sum):
    compute = _compute_dtype(x, residual, weight)
    keep = source_mask(x.shape, p, source, x.device) if p > 0 else None
    summed = x.to(compute)
    if keep is not None and not dropout_after:
        summed = torch.where(keep, summed * _scale(p, compute, x.device), 0.0)
    if residual is not None:
        summed = summed + residual.to(compute)
    mean = summed.mean(-1, keepdim=True)
    centred = summed - mean
    rstd = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)
    y = centred * rstd * weight.to(compute) + bias.to(compute)
    if keep is not None and dropout_after:
        y = torch.where(keep, y * _scale(p, compute, x.device), 0.0)
    summed_out = summed.to(out_dtype) if keep_sum else None
    return y.to(out_dtype), summed_out, mean.squeeze(-1).float(), rstd.squeeze(-1).float()


def _backward_math(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, p, source, dropout_after,
                   x_dtype, residual_dtype):
    compute = torch.float64 if torch.float64 in (grad_out.dtype, saved.dtype, weight.dtype) else torch.float32
    n_cols = grad_out.shape[-1]
    keep = source_mask(grad_out.shape, p, source, grad_out.device) if p > 0 else None
    scale = _scale(p, compute, grad_out.device)
    w = weight.to(compute)
    dy = grad_out.to(compute)
    if keep is not None and dropout_after:
        dy = torch.where(keep, dy * scale, 0.0)
    rstd = rstd.to(compute).unsqueeze(-1)
    if saved_is_output:
        xhat = (saved.to(compute) - bias.to(compute)) / w
    else:
        xhat = (saved.to(compute) - mean.to(compute).unsqueeze(-1)) * rstd
    grad_weight = (dy * xhat).reshape(-1, n_cols).sum(0)
    grad_bias = dy.reshape(-1, n_cols).sum(0)
    g = dy * w
    grad_summed = (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True)) * rstd
    if grad_sum is not None:
        grad_summed = grad_summed + grad_sum.to(compute)
    grad_residual = grad_summed.to(residual_dtype) if residual_dtype is not None else None
    grad_x = grad_summed
    if keep is not None and not dropout_after:
        grad_x = torch.where(keep, grad_x * scale, 0.0)
    return grad_x.to(x_dtype), grad_residual, grad_weight, grad_bias


# Kernels -----------------------------------------------------------------------------------------------------------


def _kernels_run(backend, dropout_after, dtypes, p, n_rows) -> bool:
    """Whether the backend's kernels run, rather than this module's torch arithmetic."""
    if p >= 1.0 or n_rows == 0:  # p = 1: nothing kept, no Philox word reaches the threshold 2^32
        return False
    return dispatch.takes(_OP_BY_ORDER[dropout_after], backend, *dtypes)


def _forward(x2, res2, weight, bias, eps, p, source, dropout_after, out_dtype, keep_sum, backend, out_bf16=None):
    """(out, summed, mean, rstd); out_bf16, a bf16 tensor shaped as out, receives out rounded to bf16 (the C++
    kernel writes it in its own pass)."""
    dtypes = (x2.dtype, None if res2 is None else res2.dtype, weight.dtype, bias.dtype, out_dtype)
    if not _kernels_run(backend, dropout_after, dtypes, p, len(x2)):
        results = _forward_math(x2, res2, weight, bias, eps, p, source, dropout_after, out_dtype, keep_sum)
        if out_bf16 is not None:
            out_bf16.copy_(results[0])
        return results
    n_rows, n_cols = x2.shape
    out = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    summed = torch.empty_like(out) if keep_sum else None
    mean = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    if backend == "cpp":
        cpp.layer_norm_forward(x2, res2, weight, bias, out, summed, mean, rstd, eps, *source.resolved(),
                               keep_threshold(p), kept_scale(p), dropout_after, out_bf16)
    else:
        from fastcls.kernels.layer_norm import layer_norm_forward_triton

        layer_norm_forward_triton(x2, res2, weight, bias, out, summed, mean, rstd, eps, source.rng,
                                  source.seed % 2**64, source.offset, keep_threshold(p), kept_scale(p), dropout_after)
        if out_bf16 is not None:
            out_bf16.copy_(out)
    return out, summed, mean, rstd


def _backward(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, p, source, dropout_after,
              x_dtype, residual_dtype, backend):
    dtypes = (grad_out.dtype, saved.dtype, weight.dtype, bias.dtype, x_dtype, residual_dtype)
    # the kernels read the upstream gradient in the saved tensor's dtype
    if not _kernels_run(backend, dropout_after, dtypes, p, len(grad_out)) or grad_out.dtype != saved.dtype:
        return _backward_math(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, p, source,
                              dropout_after, x_dtype, residual_dtype)
    n_rows, n_cols = grad_out.shape
    device = grad_out.device
    grad_x = torch.empty((n_rows, n_cols), dtype=x_dtype, device=device)
    grad_residual = None
    if residual_dtype is not None:
        grad_residual = torch.empty((n_rows, n_cols), dtype=residual_dtype, device=device)
    grad_sum = grad_sum.to(saved.dtype).contiguous() if grad_sum is not None else None
    if backend == "cpp":
        partials = cpp.layer_norm_backward(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum,
                                           grad_x, grad_residual, *source.resolved(), keep_threshold(p),
                                           kept_scale(p), dropout_after)
    else:
        from fastcls.kernels.layer_norm import layer_norm_backward_triton

        partials = layer_norm_backward_triton(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum,
                                              grad_x, grad_residual, source.rng, source.seed % 2**64, source.offset,
                                              keep_threshold(p), kept_scale(p), dropout_after)
    grad_weight, grad_bias = partials.sum(1).unbind(0)
    return grad_x, grad_residual, grad_weight, grad_bias


# Custom ops --------------------------------------------------------------------------------------------------------
# "fastcls::layer_norm_forward" and "fastcls::layer_norm_backward" run both orders on [N, H] contiguous tensors;
# the forward's autograd saves no mask (see the module docstring). `save_from` says which tensor the backward reads:
# "input" (x), "sum", "output", or "none" when nothing needs a gradient. Absent outputs are empty tensors, since a
# custom op returns tensors only.


def _forward_impl(x2: torch.Tensor, res2: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                p: float, rng: torch.Tensor | None, seed: int, offset: int, dropout_after: bool,
                out_dtype: torch.dtype, keep_sum: bool, save_from: str,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, summed, mean, rstd = _forward(x2, res2, weight, bias, eps, p, MaskSource(rng, seed, offset), dropout_after,
                                       out_dtype, keep_sum, backend)
    return out, summed if summed is not None else out.new_empty(0), mean, rstd


def _forward_fake(x2, res2, weight, bias, eps, p, rng, seed, offset, dropout_after, out_dtype, keep_sum, save_from, backend):
    out = x2.new_empty(x2.shape, dtype=out_dtype)
    stats = x2.new_empty(x2.shape[:1], dtype=torch.float32)
    return out, torch.empty_like(out) if keep_sum else out.new_empty(0), stats, torch.empty_like(stats)


def _setup_forward(ctx, inputs, output):
    x2, res2, weight, bias, _, p, rng, seed, offset, dropout_after, out_dtype, _, save_from, backend = inputs
    out, summed, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # the sum's gradient stays None unless the caller used the sum
    if save_from == "none":
        return
    saved = {"input": x2, "sum": summed, "output": out}[save_from]
    # the generator's state is saved like a tensor input, so a backward after its end_step fails loudly rather
    # than redrawing another mask
    ctx.save_for_backward(saved, weight, bias, mean, rstd, rng)
    ctx.saved_is_output, ctx.p, ctx.seed, ctx.offset = save_from == "output", p, seed, offset
    ctx.dropout_after, ctx.backend, ctx.x_dtype = dropout_after, backend, x2.dtype
    ctx.residual_dtype = res2.dtype if res2 is not None else None
    ctx.out_dtype = out_dtype


def _backward_of_forward(ctx, grad_out, grad_sum, _grad_mean, _grad_rstd):
    saved, weight, bias, mean, rstd, rng = ctx.saved_tensors
    if grad_out is None:  # only the sum was used
        grad_out = saved.new_zeros(saved.shape, dtype=ctx.out_dtype)
    grad_x, grad_residual, grad_weight, grad_bias = _backward_op(
        grad_out.contiguous(), saved, ctx.saved_is_output, weight, bias, mean, rstd,
        # an unused or absent sum's gradient: None, or (AOT autograd materialises it) zeros
        grad_sum if grad_sum is not None and grad_sum.numel() else None, rng, ctx.seed, ctx.offset, ctx.p,
        ctx.dropout_after, ctx.x_dtype, ctx.residual_dtype, ctx.backend)
    return (grad_x, grad_residual if ctx.residual_dtype is not None else None, grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype), None, None, None, None, None, None, None, None, None, None)


def _backward_impl(grad_out: torch.Tensor, saved: torch.Tensor, saved_is_output: bool, weight: torch.Tensor,
                 bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, grad_sum: torch.Tensor | None,
                 rng: torch.Tensor | None, seed: int, offset: int, p: float, dropout_after: bool,
                 x_dtype: torch.dtype, residual_dtype: torch.dtype | None,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_x, grad_residual, grad_weight, grad_bias = _backward(
        grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, p, MaskSource(rng, seed, offset),
        dropout_after, x_dtype, residual_dtype, backend)
    # fresh tensors: a custom op's outputs may not alias each other or an input
    return (grad_x, grad_residual if grad_residual is not None else grad_x.new_empty(0),
            grad_weight.clone(), grad_bias.clone())


def _backward_fake(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, rng, seed, offset, p, dropout_after,
      x_dtype, residual_dtype, backend):
    grad_x = grad_out.new_empty(grad_out.shape, dtype=x_dtype)
    grad_residual = grad_out.new_empty(grad_out.shape if residual_dtype is not None else (0,),
                                       dtype=residual_dtype or x_dtype)
    compute = torch.float64 if torch.float64 in (grad_out.dtype, saved.dtype, weight.dtype) else torch.float32
    return grad_x, grad_residual, weight.new_empty(weight.shape, dtype=compute), bias.new_empty(bias.shape,
                                                                                                 dtype=compute)


_backward_op = KernelOp("layer_norm_backward", _backward_impl, _backward_fake)
_forward_op = KernelOp("layer_norm_forward", _forward_impl, _forward_fake).with_autograd(_backward_of_forward,
                                                                                       _setup_forward)


def _save_from(x2, res2, weight, bias, dropout_after, return_sum) -> str:
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, res2, weight, bias))):
        return "none"  # inference: no autograd node, nothing saved, no check of the weight
    if dropout_after:
        return "input"
    if return_sum or not output_stands_in(weight, bias):
        return "sum"
    return "output"


def _apply(x2, res2, weight, bias, eps, p, source, dropout_after, return_sum, backend):
    save_from = _save_from(x2, res2, weight, bias, dropout_after, return_sum)
    out, summed, _, _ = _forward_op(x2, res2, weight, bias, eps, p, source.rng, source.seed, source.offset,
                                    dropout_after, _out_dtype(x2, res2), return_sum or save_from == "sum",
                                    save_from, backend)
    return (out, summed) if return_sum else out


def _check_inputs(x, residual, weight, bias, eps):
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"x: hidden size {hidden} exceeds the kernels' maximum {MAX_HIDDEN}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or t.shape != (hidden,):
            raise ValueError(f"{name} must be a tensor of shape ({hidden},), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def _prepare(op, x, residual, weight, bias, p, eps, training, seed, backend):
    """(the dropout probability in effect, its mask's source, the backend) after checking the inputs."""
    _check_p(p)
    _check_inputs(x, residual, weight, bias, eps)
    p = float(p) if training else 0.0
    source = mask_source(x.device, x.numel(), seed) if p > 0 else MaskSource(None, 0, 0)
    return p, source, dispatch.backend_for(op, x.device, backend=backend)


def dropout_add_layer_norm(x, residual, weight, bias, p, *, eps=1e-12, training=True, seed=None,
                           return_sum=False, backend=None):
    """LayerNorm(dropout(x) + residual) over the last dimension, with no dropout mask kept for the backward.

    residual=None gives LayerNorm(dropout(x)). Not training (or p == 0) skips the dropout. `seed` (any int, taken
    modulo 2^64) fixes the mask; by default each call draws one from torch's generator. return_sum=True returns
    (output, dropout(x) + residual), both differentiable (a pre-norm residual stream can continue from the sum).
    """
    p, source, backend = _prepare("dropout_add_layer_norm", x, residual, weight, bias, p, eps, training, seed,
                                  backend)
    if backend == "reference":
        return dropout_add_layer_norm_reference(x, residual, weight, bias, p, eps, source, return_sum)
    hidden = x.shape[-1]
    x2 = x.contiguous().view(-1, hidden)
    res2 = residual.contiguous().view(-1, hidden) if residual is not None else None
    result = _apply(x2, res2, weight, bias, float(eps), p, source, False, return_sum, backend)
    if return_sum:
        return result[0].view(x.shape), result[1].view(x.shape)
    return result.view(x.shape)


def layer_norm_dropout(x, weight, bias, p, *, eps=1e-12, training=True, seed=None, backend=None):
    """dropout(LayerNorm(x)) over the last dimension, with no dropout mask kept for the backward; the mask is
    drawn over the output's (= x's) flat index."""
    p, source, backend = _prepare("layer_norm_dropout", x, None, weight, bias, p, eps, training, seed, backend)
    if backend == "reference":
        return layer_norm_dropout_reference(x, weight, bias, p, eps, source)
    hidden = x.shape[-1]
    out = _apply(x.contiguous().view(-1, hidden), None, weight, bias, float(eps), p, source, True, False, backend)
    return out.view(x.shape)
