"""Mask-free dropout: the identity cases, the one mask every backend draws (bit for bit, in the forward and the
backward), its drop rate and scaling, gradients, and that nothing the size of x is kept for the backward."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcls.ops import Dropout, dispatch, dropout, dropout_reference, op_backends
from fastcls.ops.dropout import keep_mask, kept_scale, philox4x32

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# Under the Triton interpreter each program (1024 elements) costs ~6 ms, so interpreted runs get small tensors.
NUMELS = {"one": (1, 1), "seven": (7, 7), "odd_large": (1_000_003, 4099)}


def interpreted(backend) -> bool:
    name, device = backend
    return name == "triton" and device.type == "cpu"


def nonzero_randn(shape, dtype, device, generator):
    """Random values none of which is 0, so that an output of 0 marks a dropped element."""
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-3, 1.0, x)
    return x.to(dtype).to(device)


def scaled(x: torch.Tensor, p: float) -> torch.Tensor:
    """What a kept element becomes: x times fp32(1 / (1 - p)) in fp32 math (fp64 for fp64), rounded once."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    return (x.to(compute_dtype) * torch.tensor(kept_scale(p), dtype=compute_dtype, device=x.device)).to(x.dtype)


def assert_same_values(out, expected, backend):
    """Bit for bit, except that the Triton interpreter rounds fp32 to bf16 toward zero where CUDA, like the other
    backends, rounds to nearest even: there the mask must match and the values be within one bf16 ulp."""
    if interpreted(backend) and out.dtype == torch.bfloat16:
        assert torch.equal(out != 0, expected != 0)
        assert ((out.double() - expected.double()).abs() <= expected.double().abs() * 2**-7).all()
    else:
        assert torch.equal(out, expected)


def test_identity_when_not_training_or_p_zero(backend, generator):
    name, device = backend
    x = nonzero_randn((4, 5), torch.float32, device, generator).requires_grad_()
    assert dropout(x, 0.0, backend=name) is x
    assert dropout(x, 0.5, training=False, backend=name) is x
    dropout(x, 0.0, backend=name).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("numel", list(NUMELS))
def test_every_backend_draws_the_reference_mask(backend, numel, dtype, generator):
    """Bit for bit against the reference; fp16 and fp64 go through the reference's arithmetic on the CPU."""
    name, device = backend
    n = NUMELS[numel][interpreted(backend)]
    x = nonzero_randn((n,), dtype, device, generator)
    seed = 0x1234_5678_9ABC_DEF0
    out = dropout(x, 0.3, seed=seed, backend=name)
    assert out.dtype == dtype and out.shape == x.shape
    keep = keep_mask(x.shape, 0.3, seed, device)
    assert torch.equal(out != 0, keep)
    assert_same_values(out, dropout_reference(x, 0.3, seed), backend)
    assert_same_values(out[keep], scaled(x[keep], 0.3), backend)


def test_multidimensional_and_strided_inputs_use_the_row_major_index(backend, generator):
    name, device = backend
    x = nonzero_randn((13, 7, 9), torch.float32, device, generator)
    transposed = x.transpose(0, 2)
    out = dropout(transposed, 0.4, seed=99, backend=name)
    assert out.shape == transposed.shape
    assert torch.equal(out != 0, keep_mask(transposed.shape, 0.4, 99, device))
    assert torch.equal(out, dropout_reference(transposed.contiguous(), 0.4, 99))


def test_philox_matches_random123_and_triton(backend):
    """The reference's Philox against the Random123 known answer and against tl.randint4x on int64 offsets, whose
    counters here cross 2^32 (the high counter word); the kernels are checked against the reference."""
    assert [int(w) for w in philox4x32(0, torch.tensor([0]))] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    name, device = backend
    if name != "triton":
        pytest.skip("Triton only")
    import triton
    import triton.language as tl

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 4):
        pytest.skip("before Triton 3.4, randint4x runs 64-bit Philox on 64-bit offsets")

    @triton.jit
    def randint4x_kernel(out_ptr, seed, first_offset, BLOCK: tl.constexpr):
        index = tl.arange(0, BLOCK)
        words = tl.randint4x(seed, first_offset + index.to(tl.int64))
        for w in tl.static_range(4):
            tl.store(out_ptr + index * 4 + w, words[w].to(tl.int32, bitcast=True))

    first = 2**32 - 5
    for seed in (1, 2**31 + 7, 2**63 + 11):
        out = torch.empty(4 * 16, dtype=torch.int32, device=device)
        randint4x_kernel[(1,)](out, seed, first, BLOCK=16)
        expected = torch.stack(philox4x32(seed, torch.arange(first, first + 16)), dim=1).flatten()
        assert torch.equal(out.cpu().long() & 0xFFFFFFFF, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_redraws_the_forward_mask(backend, dtype, generator):
    name, device = backend
    x = nonzero_randn((33, 31), dtype, device, generator).requires_grad_()
    out = dropout(x, 0.25, seed=2024, backend=name)
    assert torch.equal(out, dropout(x, 0.25, seed=2024, backend=name))
    keep = out != 0
    upstream = torch.randn((31, 33), generator=generator).to(dtype).to(device).t()  # not contiguous
    out.backward(upstream)
    assert_same_values(x.grad, torch.where(keep, scaled(upstream, 0.25), 0.0), backend)


def test_gradients_through_a_sum(backend, generator):
    """A broadcast upstream gradient (stride 0) still lines up with the forward's elements."""
    name, device = backend
    x = nonzero_randn((5, 40), torch.float32, device, generator).requires_grad_()
    out = dropout(x, 0.5, seed=5, backend=name)
    out.sum().backward()
    assert torch.equal(x.grad, torch.where(out != 0, kept_scale(0.5), 0.0))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_rate(backend, p):
    if interpreted(backend):
        pytest.skip("the interpreter draws the reference's mask bit for bit; 10^6 elements would take minutes")
    name, device = backend
    n = 1_000_000
    out = dropout(torch.ones(n, device=device), p, seed=int(p * 1000), backend=name)
    dropped = (out == 0).double().mean().item()
    assert abs(dropped - p) <= 4 * math.sqrt(p * (1 - p) / n)
    kept = out[out != 0]
    assert torch.equal(kept, torch.full_like(kept, kept_scale(p)))
    # fp32(1 / (1 - p)) is within half an ulp of the exact scale.
    assert abs(kept[0].item() - 1 / (1 - p)) <= 2**-24 / (1 - p) * 2


def test_kept_values_in_bf16_are_the_rounded_scaled_values(backend, generator):
    name, device = backend
    x = nonzero_randn((4000,), torch.bfloat16, device, generator)
    out = dropout(x, 0.1, seed=77, backend=name)
    keep = out != 0
    exact = x[keep].double() / 0.9
    # Half an ulp for rounding to nearest (a whole one under the interpreter, which truncates), plus the
    # rounding of the scale to fp32.
    tolerance = 2**-7 if interpreted(backend) else 2**-8 + 2**-24
    assert ((out[keep].double() - exact).abs() <= exact.abs() * tolerance).all()


def test_p_one_drops_everything_and_tiny_p_keeps_everything(backend, generator):
    name, device = backend
    x = nonzero_randn((3, 700), torch.float32, device, generator)
    x[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e38, -1e-38])
    x.requires_grad_()
    out = dropout(x, 1.0, seed=3, backend=name)
    assert torch.equal(out, torch.zeros_like(x))
    out.backward(torch.ones_like(x))
    assert torch.equal(x.grad, torch.zeros_like(x))
    # round(2^-34 * 2^32) = 0: no word is below the threshold, and fp32(1 / (1 - p)) is 1.
    torch.testing.assert_close(dropout(x, 2**-34, seed=3, backend=name), x.detach(), rtol=0, atol=0, equal_nan=True)


def test_dropped_nan_and_inf_become_zero(backend):
    name, device = backend
    x = torch.tensor([float("nan"), float("inf")] * 512, device=device)
    out = dropout(x, 0.5, seed=11, backend=name)
    keep = keep_mask(x.shape, 0.5, 11, device)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    assert torch.equal(out[keep].isnan(), x[keep].isnan())
    assert torch.equal(out[keep].isinf(), x[keep].isinf())


def test_gradcheck_float64(backend, generator):
    name, device = backend
    x = nonzero_randn((3, 7), torch.float64, device, generator).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: dropout(t, 0.4, seed=1234, backend=name), (x,))
    assert torch.autograd.gradgradcheck(lambda t: dropout(t, 0.4, seed=1234, backend=name), (x,))
    assert torch.autograd.gradcheck(lambda t: dropout_reference(t, 0.4, 1234), (x,))


def test_fresh_seed_each_call_and_manual_seed_repeats(backend):
    name, device = backend
    x = torch.ones(1024, device=device)
    first, second = dropout(x, 0.5, backend=name), dropout(x, 0.5, backend=name)
    assert not torch.equal(first, second)
    torch.manual_seed(31)
    first = dropout(x, 0.5, backend=name)
    torch.manual_seed(31)
    assert torch.equal(first, dropout(x, 0.5, backend=name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_saves_nothing_the_size_of_x(backend, dtype, generator):
    name, device = backend
    if name == "reference":
        pytest.skip("the reference is differentiated by autograd, which saves the mask")
    saved_bytes = []

    def pack(tensor):
        saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    x = nonzero_randn((64, 48), dtype, device, generator).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = dropout(x, 0.5, seed=8, backend=name)
    assert saved_bytes == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.dropout(x, 0.5)
    assert sum(saved_bytes) >= x.numel()  # the hook does see what torch's dropout saves
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, torch.where(out != 0, scaled(torch.ones_like(x), 0.5), 0.0))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_invalid_p_raises(p):
    x = torch.ones(3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, p)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(p)


def test_module_replaces_torch_dropout():
    module, torch_module = Dropout(0.2, inplace=True), nn.Dropout(0.2, inplace=True)
    assert repr(module) == repr(torch_module) == "Dropout(p=0.2, inplace=True)"
    assert module.p == 0.2
    x = torch.ones(4096)
    torch.manual_seed(0)
    out = module(x)
    assert out is not x and torch.equal(x, torch.ones(4096))
    assert 0 < (out == 0).sum() < 4096
    module.eval()
    assert module(x) is x


def test_op_backends_lists_dropout():
    backends = op_backends()["dropout"]
    assert set(backends) == {"cpu", "cuda"}
    assert {choice.backend for choice in backends.values()} <= set(dispatch.BACKENDS)
