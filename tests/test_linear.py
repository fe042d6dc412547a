"""fastcls.ops.linear: a bf16 CPU Linear with the bias in oneDNN's epilogue gives F.linear's output and gradients bit
for bit, on odd shapes and strided inputs; other cases are F.linear itself."""
import pytest
import torch
import torch.nn.functional as F

from fastcls.ops.linear import epilogue_bias_applies, linear

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 3, 5), (33, 384, 1152), (7, 17, 31)], ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_bf16_matches_f_linear_bit_for_bit(shape, strided, generator):
    tokens, d_in, d_out = shape
    source = torch.randn(tokens, 3 * d_in if strided else d_in, generator=generator).to(torch.bfloat16)
    x = (source[:, d_in:2 * d_in] if strided else source).requires_grad_()
    weight = torch.randn(d_out, d_in, generator=generator).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(d_out, generator=generator).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(tokens, d_out, generator=generator).to(torch.bfloat16)
    assert epilogue_bias_applies(x, weight, bias)
    ours, theirs = linear(x, weight, bias), F.linear(x, weight, bias)
    assert torch.equal(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, [x, weight, bias], grad),
                    torch.autograd.grad(theirs, [x, weight, bias], grad), strict=True):
        assert torch.equal(a, b)


def test_other_cases_are_f_linear(generator):
    x = torch.randn(4, 6, generator=generator)
    weight, bias = torch.randn(5, 6, generator=generator), torch.randn(5, generator=generator)
    assert not epilogue_bias_applies(x, weight, bias)  # fp32
    assert not epilogue_bias_applies(x.bfloat16(), weight.bfloat16(), None)  # no bias: a plain mm already
    assert not epilogue_bias_applies(x.bfloat16(), weight, bias)  # mixed dtypes (autocast casts them)
    assert not epilogue_bias_applies(x.bfloat16()[None], weight.bfloat16(), bias.bfloat16())  # 3-D
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
