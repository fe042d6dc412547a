"""A Linear layer whose CPU forward adds the bias inside oneDNN's product.

torch's CPU `F.linear` with a bias runs `addmm`: for bf16 it first copies the bias, broadcast, into the whole
output, then lets the product accumulate onto it, two passes and two parallel regions where the bias could be
the product's epilogue. `torch.ops.mkldnn._linear_pointwise` (the op torch's own inductor emits for CPU linears)
adds it there. The backward is `addmm`'s: grad_input = grad_out @ weight, grad_weight = grad_out^T @ input,
grad_bias = the column sums of grad_out. Same dtype only (input, weight and bias alike): under autocast over
fp32 weights `F.linear` keeps its casts.
"""
import torch
import torch.nn.functional as F

# a private op of torch's CPU build (inductor's), checked once rather than assumed
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class _EpilogueBiasLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.mm(weight) if ctx.needs_input_grad[0] else None
        grad_weight = grad_out.t().mm(x) if ctx.needs_input_grad[1] else None
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def epilogue_bias_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.device.type == "cpu" and x.dim() == 2 and x.dtype == torch.bfloat16 and weight.dtype == x.dtype
            and bias is not None and bias.dtype == x.dtype and _ONEDNN_LINEAR)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with the bias in the product's epilogue where that applies (2-D bf16 CPU tensors
    of one dtype)."""
    if epilogue_bias_applies(x, weight, bias):
        return _EpilogueBiasLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
