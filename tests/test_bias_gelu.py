"""GELU(x + bias): the C++ kernels against float64 GELU (values and both gradients, fp32 and bf16, odd widths, bias
fp32, bf16 or absent), the values where erf saturates, NaN, the custom ops under opcheck, and the feed-forward block
of a real encoder layer against transformers' own."""
import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_encoder

from fastcls.models.encoder import _activated_ffn_in, _Layer
from fastcls.ops import dispatch
from fastcls.ops.bias_gelu import _backward_op, _bias_gelu_op, bias_gelu, bias_gelu_applies, bias_gelu_reference

needs_cpp = pytest.mark.skipif(dispatch.cpp_ext is None, reason="C++ extension not built")
SHAPES = [(1, 1), (3, 17), (37, 1539), (64, 16)]
# fp32: within a few ulps of float64 GELU at these magnitudes, as torch's own fp32 GELU; bf16: one rounding
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=2e-6), torch.bfloat16: dict(rtol=2 ** -8, atol=1e-5)}


def fp64_gelu(x, bias, grad_out):
    t = (x.double() + (0 if bias is None else bias.double())).requires_grad_()
    y = F.gelu(t)
    y.backward(grad_out.double())
    return y.detach(), t.grad, t.grad.sum(0)


@needs_cpp
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16, None], ids=["bias_fp32", "bias_bf16", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_fp64_gelu(shape, dtype, bias_dtype, generator):
    x = (3 * torch.randn(shape, generator=generator)).to(dtype).requires_grad_()
    bias = None if bias_dtype is None else torch.randn(shape[1], generator=generator).to(bias_dtype).requires_grad_()
    grad_out = torch.randn(shape, generator=generator).to(dtype)
    assert bias_gelu_applies(x)
    y = bias_gelu(x, bias)
    y.backward(grad_out)
    ref_y, ref_grad_x, ref_grad_bias = fp64_gelu(x.detach(), None if bias is None else bias.detach(), grad_out)
    assert y.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(y.double(), ref_y, **TOLERANCE[dtype])
    torch.testing.assert_close(x.grad.double(), ref_grad_x, **TOLERANCE[dtype])
    if bias is not None:
        assert bias.grad.dtype == bias_dtype
        # fp32 sums of unrounded gradients; a bf16 bias gradient is rounded once
        torch.testing.assert_close(bias.grad.double(), ref_grad_bias, rtol=TOLERANCE[bias_dtype]["rtol"],
                                   atol=1e-4 * shape[0] ** 0.5)


@needs_cpp
def test_kernel_across_erf_range_and_saturation():
    """Every t from -12 to 12 (erf's clamp at |t| / sqrt(2) = 4 inside): GELU and its slope as float64's."""
    t = torch.linspace(-12, 12, 48003).reshape(3, -1)
    y = bias_gelu(t.clone().requires_grad_(), None)
    x = t.clone().requires_grad_()
    bias_gelu(x, None).backward(torch.ones_like(t))
    ref_y, ref_slope, _ = fp64_gelu(t, None, torch.ones_like(t))
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(x.grad.double(), ref_slope, rtol=1e-5, atol=2e-6)
    assert torch.equal(bias_gelu(torch.tensor([[30.0, -30.0]]), None), torch.tensor([[30.0, 0.0]]))


@needs_cpp
def test_nan_propagates_to_output_and_gradient():
    x = torch.tensor([[0.5, float("nan"), -1.0]], requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    y = bias_gelu(x, bias)
    y.backward(torch.ones_like(y))
    assert y.isnan().tolist() == [[False, True, False]]
    assert x.grad.isnan().tolist() == [[False, True, False]]
    assert bias.grad.isnan().tolist() == [False, True, False]


@needs_cpp
def test_leading_dimensions_and_strided_input(generator):
    x = torch.randn(4, 6, 20, generator=generator)[:, ::2]  # not contiguous
    bias = torch.randn(20, generator=generator)
    torch.testing.assert_close(bias_gelu(x, bias), bias_gelu_reference(x, bias), rtol=1e-5, atol=2e-6)


def test_reference_backend_and_bad_bias(generator):
    x = torch.randn(5, 8, generator=generator)
    bias = torch.randn(8, generator=generator)
    assert torch.equal(bias_gelu(x, bias, backend="reference"), F.gelu(x + bias))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        bias_gelu(x, torch.zeros(7))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype, generator):
    x = torch.randn(6, 21, generator=generator).to(dtype)
    bias = torch.randn(21, generator=generator)
    torch.library.opcheck(_bias_gelu_op.op, (x.clone().requires_grad_(), bias.clone().requires_grad_()))
    torch.library.opcheck(_bias_gelu_op.op, (x, None))
    torch.library.opcheck(_backward_op.op, (torch.randn(6, 21, generator=generator).to(dtype), x, bias))


@needs_cpp
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_feed_forward_block_matches_transformers(family, generator):
    """A layer's first feed-forward product and GELU through the encoder's path with the kernels, against the
    modules' own forward."""
    model = tiny_encoder(family)
    layer = model.transformer.layer[0] if family == "distilbert" else model.encoder.layer[0]
    part = _Layer(layer, family)
    assert part.exact_gelu
    h = torch.randn(13, model.config.hidden_size if family != "distilbert" else model.config.dim,
                    generator=generator, requires_grad=True)
    ours = _activated_ffn_in(part, h, kernels=True)
    theirs = part.act(part.ffn_in(h))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=2e-6)
    grad = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, [h, part.ffn_in.weight, part.ffn_in.bias], grad)
    theirs_grads = torch.autograd.grad(theirs, [h, part.ffn_in.weight, part.ffn_in.bias], grad)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def in_pair_layout(t, layout):
    """t [R, C] as bf16 in a weight gradient's layout: rows paired (ROW_PAIRS, [R/2][C][2]) or pair-packed 48-column
    panels (PAIR_PANELS, [C/48][R/2][48][2]); the odd row and the columns past C zero."""
    from fastcls.ops import cpp

    rows, cols = t.shape
    t = F.pad(t.to(torch.bfloat16).view(torch.int16), (0, 0, 0, rows % 2))
    if layout == cpp.ROW_PAIRS:
        return t.view(-1, 2, cols).transpose(1, 2).flatten()
    panels = -(-cols // cpp.LINEAR_PANEL)
    t = F.pad(t, (0, panels * cpp.LINEAR_PANEL - cols)).view(-1, 2, panels, cpp.LINEAR_PANEL)
    return t.permute(2, 0, 3, 1).flatten()


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["row pairs", "pair panels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(35, 1539), (1, 50), (6, 3000)], ids=str)
def test_cpp_kernels_write_the_weight_gradients_layouts(shape, dtype, layout, threads, generator):
    # pairs: the output (the forward's) and grad_x (the backward's) in bf16 in either layout of the weight gradient,
    # from row pairs inside a thread's rows and pairs cut by threads alike; nothing else changes
    from fastcls.ops import cpp

    code = cpp.ROW_PAIRS if layout == "row pairs" else cpp.PAIR_PANELS
    x, grad_out = ((3 * torch.randn(shape, generator=generator)).to(dtype) for _ in range(2))
    bias = torch.randn(shape[1], generator=generator)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for paired in (False, True):
            pairs = cpp.pairs_empty(*shape, code) if paired else None
            if pairs is not None:
                pairs.view(torch.int16)[in_pair_layout(torch.ones(shape), code) != 0] = -1  # poison what is written
            y = cpp.bias_gelu_forward(x, bias, pairs, code)
            if paired:
                assert torch.equal(y, plain_y) and torch.equal(pairs.view(torch.int16), in_pair_layout(y, code))
            grad_pairs = cpp.pairs_empty(*shape, code) if paired else None
            grad_x, grad_bias = cpp.bias_gelu_backward(grad_out, x, bias, grad_pairs, code)
            if paired:
                assert torch.equal(grad_x, plain_grad_x) and torch.equal(grad_bias, plain_grad_bias)
                assert torch.equal(grad_pairs.view(torch.int16), in_pair_layout(grad_x, code))
            plain_y, plain_grad_x, plain_grad_bias = y, grad_x, grad_bias
    finally:
        torch.set_num_threads(before)
