"""GELU(x + bias), the erf form, as one pass forward and one backward: the bias add, the activation and the bias
gradient's column sums, which torch runs as an addmm's bias copy, `gelu`, `gelu_backward` and a `sum`.

The feed-forward block's first product runs without its bias (`F.linear(h, weight)`); this op adds the bias in
fp32, applies GELU and rounds once to x's dtype (torch rounds the biased product to bf16 before its GELU). The
backward recomputes t = x + bias from the saved x (the tensor torch's gelu saves too) and returns
grad_x = grad_out * gelu'(t), rounded to x's dtype, and grad_bias, the fp32 column sums of the unrounded grad_x,
in the bias's dtype.

erf is a rational approximation and exp a polynomial one (csrc/bias_gelu.cpp): outputs lie within ~1e-6 of
float64 GELU, as torch's fp32 GELU does. Backends: cpp (fp32 and bf16 on the CPU, where torch's GELU costs as
much as a small matrix product); everywhere else the reference, `gelu(x + bias)` in torch ops. The kernels run
inside the custom ops "fastcls::bias_gelu" and "fastcls::bias_gelu_backward", so torch.compile traces through them.
"""
import torch
import torch.nn.functional as F

from fastcls.ops import cpp, dispatch
from fastcls.ops.library import KernelOp

dispatch.register_op("bias_gelu", cpp=cpp.BIAS_GELU_DTYPES)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu(x + bias) in fp32 (fp64 for fp64 x), rounded to x's dtype; differentiable by autograd."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = x.to(compute) if bias is None else x.to(compute) + bias.to(compute)
    return F.gelu(t).to(x.dtype)


def _forward_impl(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return cpp.bias_gelu_forward(x, bias)


def _forward_fake(x, bias):
    return torch.empty_like(x)


def _backward_impl(grad_out: torch.Tensor, x: torch.Tensor,
                   bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return cpp.bias_gelu_backward(grad_out, x, bias)


def _backward_fake(grad_out, x, bias):
    return torch.empty_like(x), x.new_empty(x.shape[-1], dtype=torch.float32)


_backward_op = KernelOp("bias_gelu_backward", _backward_impl, _backward_fake)


def _setup(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    grad_x, grad_bias = _backward_op(grad_out.contiguous(), x, bias)
    return grad_x, None if bias is None else grad_bias.to(bias.dtype)


_bias_gelu_op = KernelOp("bias_gelu", _forward_impl, _forward_fake).with_autograd(_backward, _setup)


def bias_gelu_applies(x: torch.Tensor, backend: str | None = None) -> bool:
    """Whether the kernel runs gelu(x + bias) for tensors like x (else `bias_gelu` runs the reference)."""
    return dispatch.backend_for("bias_gelu", x.device, x.dtype, backend=backend) == "cpp"


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """gelu(x + bias) over the last dimension (bias: [x.shape[-1]], any float dtype, or None), GELU's erf form."""
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
    if not bias_gelu_applies(x, backend) or x.numel() == 0:
        return bias_gelu_reference(x, bias)
    n_cols = x.shape[-1]
    return _bias_gelu_op(x.contiguous().view(-1, n_cols), bias).view(x.shape)
