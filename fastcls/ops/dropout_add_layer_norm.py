"""Dropout, residual add and LayerNorm in one pass, keeping no dropout mask.

Two orders, the two that end BERT-family blocks:

- `dropout_add_layer_norm(x, residual, weight, bias, p)` = LayerNorm(dropout(x) + residual) (self-attention
  output and feed-forward output blocks; residual=None gives LayerNorm(dropout(x)));
- `layer_norm_dropout(x, weight, bias, p)` = dropout(LayerNorm(x)) (the embeddings).

The keep mask is `fastcls.ops.dropout`'s: element i of the contiguous [N, H] tensor (x for the first order, the
output for the second) takes word i % 4 of Philox4x32-10 at counter i // 4 under the 64-bit seed and is kept iff
that word is >= round(p * 2^32); kept elements are scaled by fp32(1 / (1 - p)). So every backend draws the same
mask for the same seed, and `fastcls.ops.dropout.keep_mask(x.shape, p, seed)` reconstructs it. Arithmetic is
fp32 (fp64 for fp64 tensors) whatever the storage dtype, rounded once on the way out; mean and rstd are fp32.

What the backward keeps (the memory design):

- dropout(x) + residual then LayerNorm: torch keeps the byte mask and the pre-norm sum s (N x H each). The
  LayerNorm output y is kept alive anyway by the next layer (its Linear saves its input), so the fused op saves
  y itself, plus the seed and the per-row rstd, and the backward recomputes xhat = (y - bias) / weight (apex's
  memory-efficient LayerNorm): no tensor of the size of x beyond the one the model holds already. That recovery
  fails where weight is 0 (y carries no trace of xhat) and loses precision where |bias| >> |weight| (y's rounding
  error is amplified by |bias / weight|). So it is used only where every column has weight != 0 and |bias| <=
  64 |weight|; otherwise the op saves s and the per-row mean instead, like torch minus the mask. The check reads
  the weight once per weight version (an optimizer step bumps the versions; fastcls's FusedAdamW does so too).
  On CUDA it runs behind the GPU's work, never waiting for it: a forward uses the latest finished check, made
  with a 4x margin so that it holds a step later, and saves s until a first check has finished.
  `return_sum=True` returns s, which the caller keeps alive, so s is saved then.
- LayerNorm then dropout: the output is dropout(y), which lost y where dropped, so the op saves its input x (the
  tensor torch's LayerNorm saves too) with mean and rstd, and not the mask.

The weight and bias gradients are summed per program (Triton) or per thread (C++) into fp32 partial buffers,
then reduced by one small torch sum: no atomics. Offsets are int64.

Output dtype: that of dropout(x) + residual (torch's type promotion), or fp32 under autocast, as torch's
autocast runs layer_norm in fp32. Backends (both orders registered below with `fastcls.ops.dispatch`): triton
(fp32/bf16/fp16 on CUDA, or CPU under TRITON_INTERPRET=1), cpp (fp32 and bf16 on CPU), reference (PyTorch ops
differentiated by autograd, which keeps the mask). Dtypes a backend's kernels do not take, and p = 1, run this
module's own PyTorch arithmetic inside the mask-free autograd Function, which saves the same tensors.
"""
import weakref

import torch
import torch.nn.functional as F

from fastcls.ops import cpp, dispatch
from fastcls.ops.dropout import (
    _check_p,
    draw_seed,
    keep_mask,
    keep_threshold,
    kept_scale,
)

dispatch.register_op("dropout_add_layer_norm", cpp=cpp.LAYER_NORM_DTYPES,
                     triton=(torch.float32, torch.bfloat16, torch.float16))
dispatch.register_op("layer_norm_dropout", **dispatch.kernel_dtypes("dropout_add_layer_norm"))
# The two orders' names by dropout_after: the same kernels run both.
_OP_BY_ORDER = {False: "dropout_add_layer_norm", True: "layer_norm_dropout"}
MAX_HIDDEN = 8192
# y = weight * xhat + bias is rounded to y's dtype: recovering xhat scales that error by |bias / weight|.
MAX_BIAS_OVER_WEIGHT = 64.0


# References --------------------------------------------------------------------------------------------------------


def dropout_add_layer_norm_reference(x, residual, weight, bias, p, eps, seed, return_sum=False):
    """LayerNorm(dropout(x) + residual) from torch ops with the kernels' mask, differentiable by autograd."""
    _check_p(p)
    compute = _compute_dtype(x, residual, weight)
    summed = x.to(compute)
    if p > 0:
        summed = torch.where(keep_mask(x.shape, p, seed, x.device), summed * _scale(p, compute, x.device), 0.0)
    if residual is not None:
        summed = summed + residual.to(compute)
    out_dtype = _out_dtype(x, residual)
    y = F.layer_norm(summed, (x.shape[-1],), weight.to(compute), bias.to(compute), eps).to(out_dtype)
    return (y, summed.to(out_dtype)) if return_sum else y


def layer_norm_dropout_reference(x, weight, bias, p, eps, seed):
    """dropout(LayerNorm(x)) from torch ops with the kernels' mask, differentiable by autograd."""
    _check_p(p)
    compute = _compute_dtype(x, None, weight)
    y = F.layer_norm(x.to(compute), (x.shape[-1],), weight.to(compute), bias.to(compute), eps)
    if p > 0:
        y = torch.where(keep_mask(x.shape, p, seed, x.device), y * _scale(p, compute, x.device), 0.0)
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


def _forward_math(x, residual, weight, bias, eps, p, seed, dropout_after, out_dtype, keep_sum):
    compute = _compute_dtype(x, residual, weight)
    keep = keep_mask(x.shape, p, seed, x.device) if p > 0 else None
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


def _backward_math(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, p, seed, dropout_after,
                   x_dtype, residual_dtype):
    compute = torch.float64 if torch.float64 in (grad_out.dtype, saved.dtype, weight.dtype) else torch.float32
    n_cols = grad_out.shape[-1]
    keep = keep_mask(grad_out.shape, p, seed, grad_out.device) if p > 0 else None
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


def _forward(x2, res2, weight, bias, eps, p, seed, dropout_after, out_dtype, keep_sum, backend):
    dtypes = (x2.dtype, None if res2 is None else res2.dtype, weight.dtype, bias.dtype, out_dtype)
    if not _kernels_run(backend, dropout_after, dtypes, p, len(x2)):
        return _forward_math(x2, res2, weight, bias, eps, p, seed, dropout_after, out_dtype, keep_sum)
    n_rows, n_cols = x2.shape
    out = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2.device)
    summed = torch.empty_like(out) if keep_sum else None
    mean = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    if backend == "cpp":
        launch = cpp.layer_norm_forward
    else:
        from fastcls.kernels.layer_norm import layer_norm_forward_triton as launch
    launch(x2, res2, weight, bias, out, summed, mean, rstd, eps, seed, keep_threshold(p), kept_scale(p),
           dropout_after)
    return out, summed, mean, rstd


def _backward(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, p, seed, dropout_after,
              x_dtype, residual_dtype, backend):
    dtypes = (grad_out.dtype, saved.dtype, weight.dtype, bias.dtype, x_dtype, residual_dtype)
    # the kernels read the upstream gradient in the saved tensor's dtype
    if not _kernels_run(backend, dropout_after, dtypes, p, len(grad_out)) or grad_out.dtype != saved.dtype:
        return _backward_math(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, p, seed,
                              dropout_after, x_dtype, residual_dtype)
    n_rows, n_cols = grad_out.shape
    device = grad_out.device
    grad_x = torch.empty((n_rows, n_cols), dtype=x_dtype, device=device)
    grad_residual = None
    if residual_dtype is not None:
        grad_residual = torch.empty((n_rows, n_cols), dtype=residual_dtype, device=device)
    grad_sum = grad_sum.to(saved.dtype).contiguous() if grad_sum is not None else None
    if backend == "cpp":
        launch = cpp.layer_norm_backward
    else:
        from fastcls.kernels.layer_norm import layer_norm_backward_triton as launch
    partials = launch(grad_out, saved, saved_is_output, weight, bias, mean, rstd, grad_sum, grad_x, grad_residual,
                      seed, keep_threshold(p), kept_scale(p), dropout_after)
    grad_weight, grad_bias = partials.sum(1).unbind(0)
    return grad_x, grad_residual, grad_weight, grad_bias


# When the output can stand in for the pre-norm sum -----------------------------------------------------------------


_recoverable_cache: dict[int, "_RecoverableCheck"] = {}
# The answer a CUDA check may lend to later weight versions is computed with this much margin: |bias| within 16
# |weight| instead of 64, so a later version stays within the exact bound unless one optimizer step shrinks a
# LayerNorm weight or grows its bias fourfold (AdamW moves an element by about lr per step).
LENT_ANSWER_MARGIN = 4.0


class _RecoverableCheck:
    """One (weight, bias) pair's check, redone only when an optimizer step has changed their versions. On CUDA it
    runs asynchronously: its flag is copied to pinned host memory behind the GPU's work and read once the copy's
    event has completed, so no forward ever waits for it."""

    def __init__(self, weight, bias):
        self.weight_ref, self.bias_ref = weakref.ref(weight), weakref.ref(bias)
        self.versions = None  # the versions the pending or finished check looked at
        self.event = self.flag = None
        self.answer: bool | None = None  # the latest finished check's answer (with margin), whatever its version

    def current(self, weight, bias) -> bool:
        return self.weight_ref() is weight and self.bias_ref() is bias and self.versions == (weight._version,
                                                                                              bias._version)

    def collect(self) -> None:
        if self.event is not None and self.event.query():
            self.answer, self.event = bool(self.flag[0]), None


def _xhat_recoverable_from_output(weight, bias) -> bool:
    """Whether xhat = (y - bias) / weight is exact enough in every column (see the module docstring)."""
    check = _recoverable_cache.get(id(weight))
    if check is None or check.weight_ref() is not weight or check.bias_ref() is not bias:
        check = _recoverable_cache[id(weight)] = _RecoverableCheck(weight, bias)
    if weight.device.type == "cpu":  # reading the answer costs nothing here: the exact check, once per version
        if not check.current(weight, bias):
            check.versions, check.answer = (weight._version, bias._version), _recoverable(weight, bias)
        return check.answer
    # On CUDA reading the answer back would cost a host sync. Instead every LayerNorm's check runs behind the GPU's
    # work, all stale ones in one batch, and a forward uses the latest finished answer, which was computed with a
    # margin (LENT_ANSWER_MARGIN) so that it still holds a step later. Until a first answer arrives, the op saves
    # the pre-norm sum: always exact, only more memory.
    check.collect()
    if not check.current(weight, bias) and check.event is None:
        _launch_recoverable_checks(weight.device)
    return bool(check.answer)


def _launch_recoverable_checks(device) -> None:
    if len(_recoverable_cache) > 4096:
        _recoverable_cache.clear()
    stale = []
    for key, check in list(_recoverable_cache.items()):
        weight, bias = check.weight_ref(), check.bias_ref()
        if weight is None or bias is None:
            del _recoverable_cache[key]
        elif weight.device == device and check.event is None and not check.current(weight, bias):
            stale.append((check, weight, bias))
    with torch.no_grad():
        # one answer for all of them (a dozen launches a step, not a dozen per LayerNorm): a single failing column
        # anywhere makes every LayerNorm save its sum, which is exact, only larger
        flag = _recoverable_flag(torch.cat([w.detach().float().flatten() for _, w, _ in stale]),
                                 torch.cat([b.detach().float().flatten() for _, _, b in stale]),
                                 MAX_BIAS_OVER_WEIGHT / LENT_ANSWER_MARGIN)
        host = torch.empty(1, dtype=torch.bool, pin_memory=True)
        host.copy_(flag.reshape(1), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    for check, weight, bias in stale:
        check.versions, check.event, check.flag = (weight._version, bias._version), event, host


def _recoverable_flag(weight, bias, max_bias_over_weight: float = MAX_BIAS_OVER_WEIGHT) -> torch.Tensor:
    w, b = weight.float().abs(), bias.float().abs()
    return ((w > 0) & (b <= max_bias_over_weight * w) & torch.isfinite(w)).all()


def _recoverable(weight, bias) -> bool:
    with torch.no_grad():
        return bool(_recoverable_flag(weight, bias))


# Autograd ----------------------------------------------------------------------------------------------------------


class _FusedLayerNormFunction(torch.autograd.Function):
    """Forward and backward of both orders on [N, H] contiguous tensors; saves no mask (see the module docstring)."""

    @staticmethod
    def forward(ctx, x2, res2, weight, bias, eps, p, seed, dropout_after, return_sum, backend):
        out_dtype = _out_dtype(x2, res2)
        needs_grad = any(ctx.needs_input_grad[:4])
        if dropout_after:
            save_from = "input"
        elif return_sum or (needs_grad and not _xhat_recoverable_from_output(weight, bias)):
            save_from = "sum"
        else:
            save_from = "output"
        keep_sum = return_sum or (needs_grad and save_from == "sum")
        out, summed, mean, rstd = _forward(x2, res2, weight, bias, eps, p, seed, dropout_after, out_dtype,
                                           keep_sum, backend)
        if needs_grad:
            saved = {"input": x2, "sum": summed, "output": out}[save_from]
            ctx.save_for_backward(saved, weight, bias, mean, rstd)
            ctx.saved_is_output = save_from == "output"
            ctx.p, ctx.seed, ctx.dropout_after, ctx.backend = p, seed, dropout_after, backend
            ctx.x_dtype = x2.dtype
            ctx.residual_dtype = res2.dtype if res2 is not None else None
        return (out, summed) if return_sum else out

    @staticmethod
    def backward(ctx, grad_out, grad_sum=None):
        saved, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_residual, grad_weight, grad_bias = _backward(
            grad_out.contiguous(), saved, ctx.saved_is_output, weight, bias, mean, rstd, grad_sum, ctx.p, ctx.seed,
            ctx.dropout_after, ctx.x_dtype, ctx.residual_dtype, ctx.backend)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_residual if ctx.needs_input_grad[1] else None,
                grad_weight.to(weight.dtype) if ctx.needs_input_grad[2] else None,
                grad_bias.to(bias.dtype) if ctx.needs_input_grad[3] else None,
                None, None, None, None, None, None)


def _apply(x2, res2, weight, bias, eps, p, seed, dropout_after, return_sum, backend):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, res2, weight, bias)):
        return _FusedLayerNormFunction.apply(x2, res2, weight, bias, eps, p, seed, dropout_after, return_sum,
                                             backend)
    # inference: no autograd node, nothing saved, no check of the weight (a host sync on CUDA)
    out, summed, _, _ = _forward(x2, res2, weight, bias, eps, p, seed, dropout_after, _out_dtype(x2, res2),
                                 return_sum, backend)
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
    """(the dropout probability in effect, its seed, the backend) after checking the inputs."""
    _check_p(p)
    _check_inputs(x, residual, weight, bias, eps)
    p = p if training else 0.0
    seed = (draw_seed() if seed is None else seed % 2**64) if p > 0 else 0
    return p, seed, dispatch.backend_for(op, x.device, backend=backend)


def dropout_add_layer_norm(x, residual, weight, bias, p, *, eps=1e-12, training=True, seed=None,
                           return_sum=False, backend=None):
    """LayerNorm(dropout(x) + residual) over the last dimension, with no dropout mask kept for the backward.

    residual=None gives LayerNorm(dropout(x)). Not training (or p == 0) skips the dropout. `seed` (any int, taken
    modulo 2^64) fixes the mask; by default each call draws one from torch's generator. return_sum=True returns
    (output, dropout(x) + residual), both differentiable (a pre-norm residual stream can continue from the sum).
    """
    p, seed, backend = _prepare("dropout_add_layer_norm", x, residual, weight, bias, p, eps, training, seed, backend)
    if backend == "reference":
        return dropout_add_layer_norm_reference(x, residual, weight, bias, p, eps, seed, return_sum)
    hidden = x.shape[-1]
    x2 = x.contiguous().view(-1, hidden)
    res2 = residual.contiguous().view(-1, hidden) if residual is not None else None
    result = _apply(x2, res2, weight, bias, eps, p, seed, False, return_sum, backend)
    if return_sum:
        return result[0].view(x.shape), result[1].view(x.shape)
    return result.view(x.shape)


def layer_norm_dropout(x, weight, bias, p, *, eps=1e-12, training=True, seed=None, backend=None):
    """dropout(LayerNorm(x)) over the last dimension, with no dropout mask kept for the backward; the mask is
    drawn over the output's (= x's) flat index."""
    p, seed, backend = _prepare("layer_norm_dropout", x, None, weight, bias, p, eps, training, seed, backend)
    if backend == "reference":
        return layer_norm_dropout_reference(x, weight, bias, p, eps, seed)
    hidden = x.shape[-1]
    out = _apply(x.contiguous().view(-1, hidden), None, weight, bias, eps, p, seed, True, False, backend)
    return out.view(x.shape)
