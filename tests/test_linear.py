"""fastcls's bf16 Linear products (fastcls.ops.linear, csrc/linear_bf16.cpp) against float64 products of the same
bf16 values: the output, the input, weight and bias gradients, stacked weights, row counts around the 8-row tile
and the 48-column panel, fp32 weights under autocast, packs that follow in-place and optimizer updates, the cases
that fall back to F.linear, and an encoder layer's training step with the kernels on and off."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from tiny import encoded_rows
from transformers import AutoConfig, AutoModel

from fastcls.data import collate
from fastcls.models.classifier import EncoderClassifier
from fastcls.ops import cpp, dispatch
from fastcls.ops.linear import linear, linear_applies
from fastcls.optim import FusedAdamW

# the module (fastcls.ops re-exports the function under the same name)
linear_module = importlib.import_module("fastcls.ops.linear")
needs_kernels = pytest.mark.skipif(not cpp.LINEAR_BUILT, reason="the avx512_bf16 kernels are not built or not run here")


@pytest.fixture(autouse=True)
def any_row_count(monkeypatch):
    """The kernels on every row count here (tile tails included), not only from linear.MIN_ROWS up."""
    monkeypatch.setattr(linear_module, "MIN_ROWS", 1)


def bf16(shape, generator, scale=1.0):
    return (scale * torch.randn(shape, generator=generator)).to(torch.bfloat16)


def assert_bf16_product(actual, expected, magnitude):
    """Elementwise: one bf16 rounding of the exact product (relative 2^-9, asserted at 2^-8), plus fp32
    accumulation, bounded by the sum of the terms' magnitudes."""
    assert actual.dtype == torch.bfloat16 or actual.dtype == torch.float32
    err = (actual.double() - expected).abs()
    bound = 2 ** -8 * expected.abs() + 1e-6 * magnitude + 1e-30
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@needs_kernels
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 66, 131], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("stack,width", [((384,), 384), ((96, 98), 62), ((50, 46, 48), 100), ((2,), 2)],
                         ids=["384x384", "stack2_w62", "stack3_w100", "2x2"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_forward_and_gradients_match_fp64(rows, stack, width, with_bias, generator):
    weights = [bf16((n, width), generator, 0.1).requires_grad_() for n in stack]
    bias = bf16(sum(stack), generator).requires_grad_() if with_bias else None
    x = bf16((rows, width), generator).requires_grad_()
    grad = bf16((rows, sum(stack)), generator)
    assert linear_applies(x, weights)
    y = linear(x, weights, bias)
    y.backward(grad)

    w, xd, g = torch.cat([w.detach() for w in weights]).double(), x.detach().double(), grad.double()
    ref = xd @ w.t() + (bias.detach().double() if with_bias else 0)
    assert y.shape == (rows, sum(stack)) and y.dtype == torch.bfloat16
    assert_bf16_product(y, ref, xd.abs() @ w.abs().t())
    assert_bf16_product(x.grad, g @ w, g.abs() @ w.abs())
    for weight, ref_grad, magnitude in zip(weights, (g.t() @ xd).split(list(stack)),
                                           (g.abs().t() @ xd.abs()).split(list(stack))):
        assert weight.grad.dtype == torch.bfloat16
        assert_bf16_product(weight.grad, ref_grad, magnitude)
    if with_bias:
        assert_bf16_product(bias.grad, g.sum(0), g.abs().sum(0))


@needs_kernels
@pytest.mark.parametrize("width", [2, 10, 30, 32, 34, 62, 66, 96, 390])
def test_bf16_weights_pack_to_the_bytes_of_their_exact_fp32_copies(width, generator):
    """bf16 weights pack by register transposes, fp32 ones by gathers (rounding to bf16): on fp32 copies that are
    bf16 values already, both layouts of every stack must be the same bytes, whatever the row count, the width
    (pairs past a multiple of 16) and the stack's offsets (blocks of rows cut by the panels)."""
    for rows in (2, 6, 16, 18, 46, 48, 50, 94, 130, 384):
        for stack in ([rows], [rows, 2, rows + 2]):
            weights = [bf16((n, width), generator) for n in stack]
            packs = cpp.linear_pack_wt(weights, with_pairs=True) + (cpp.linear_pack_pairs(weights),)
            wide = [w.float() for w in weights]
            expected = cpp.linear_pack_wt(wide, with_pairs=True) + (cpp.linear_pack_pairs(wide),)
            for got, want in zip(packs, expected):
                assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (rows, stack)


@needs_kernels
@pytest.mark.parametrize("rows,n_cols,width", [(1, 384, 384), (9, 100, 62), (131, 50, 2)])
def test_a_product_added_in_its_pass_is_the_add_of_the_bf16_product(rows, n_cols, width, generator):
    """linear_gemm(add_to=c) gives c.add_(product) bit for bit: the product rounded to bf16, then added in fp32."""
    a, w = bf16((rows, width), generator), bf16((n_cols, width), generator, 0.1)
    packed, _ = cpp.linear_pack_wt([w])
    c = torch.randn(rows, n_cols, generator=generator)
    expected = c.clone().add_(cpp.linear_gemm(a, packed, None, n_cols))
    got = c.clone()
    assert cpp.linear_gemm(a, packed, None, n_cols, add_to=got) is got
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="add_to"):
        cpp.linear_gemm(a, packed, None, n_cols, add_to=c.bfloat16())


@needs_kernels
def test_leading_dimensions_and_stacks_equal_the_concatenated_weight(generator):
    weights = [bf16((384, 384), generator, 0.05) for _ in range(3)]
    bias = bf16(3 * 384, generator)
    x = bf16((2, 37, 384), generator)
    stacked = linear(x, weights, bias)
    assert stacked.shape == (2, 37, 1152)
    assert torch.equal(stacked, linear(x, torch.cat(weights), bias))
    assert torch.equal(stacked[1], linear(x[1], weights, bias))


@needs_kernels
def test_fp32_weights_under_autocast_train_as_autocast_linear(generator):
    """fp32 x, weight and bias under bf16 autocast: values and fp32 gradients as F.linear's there (both round the
    same bf16 inputs; the accumulation order may differ)."""
    w = (0.05 * torch.randn(1536, 384, generator=generator)).requires_grad_()
    b = torch.randn(1536, generator=generator).requires_grad_()
    x = torch.randn(45, 384, generator=generator).requires_grad_()
    grad = torch.randn(45, 1536, generator=generator).to(torch.bfloat16)
    results = []
    for fn in (linear, F.linear):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fn is F.linear or linear_applies(x, [w])
            y = fn(x, w, b)
        results.append((y, *torch.autograd.grad(y, (x, w, b), grad)))
    for ours, torchs in zip(*results):
        assert ours.dtype == torchs.dtype
        torch.testing.assert_close(ours.float(), torchs.float(), rtol=2 ** -7, atol=1e-2)


@needs_kernels
def test_packs_follow_in_place_and_optimizer_updates(generator):
    w = bf16((96, 64), generator, 0.1).requires_grad_()
    x = bf16((10, 64), generator)
    with torch.no_grad():
        linear(x, w)
        w.add_(1.0)  # torch's in-place op bumps the version
        assert torch.equal(linear(x, w), linear(x, w.detach().clone()))

    # FusedAdamW writes the bf16 weight from its fp32 master through raw pointers, then bumps the version
    opt = FusedAdamW([w], lr=0.1, master_weights=True)
    x.requires_grad_()
    for _ in range(2):
        before = w.detach().clone()
        y = linear(x, w)
        torch.testing.assert_close(y, linear(x, before), rtol=0, atol=0)
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()
        assert not torch.equal(w.detach(), before)
    with torch.no_grad():
        assert torch.equal(linear(x, w), linear(x, w.detach().clone()))


@needs_kernels
def test_frozen_weight_and_input_without_gradient(generator):
    w = bf16((48, 32), generator)
    x = bf16((5, 32), generator).requires_grad_()
    grad = bf16((5, 48), generator)
    linear(x, w).backward(grad)
    assert_bf16_product(x.grad, grad.double() @ w.double(), grad.double().abs() @ w.double().abs())

    w.requires_grad_()
    x_frozen = x.detach()
    linear(x_frozen, w).backward(grad)
    assert_bf16_product(w.grad, grad.double().t() @ x_frozen.double(),
                        grad.double().abs().t() @ x_frozen.double().abs())


def test_falls_back_to_f_linear_where_the_kernels_do_not_apply(generator, monkeypatch):
    monkeypatch.setattr(linear_module, "MIN_ROWS", 64)
    assert not linear_applies(torch.randn(63, 4).bfloat16(), [torch.randn(6, 4).bfloat16()])  # too few rows
    monkeypatch.setattr(linear_module, "MIN_ROWS", 1)
    w, x = torch.randn(6, 4, generator=generator), torch.randn(3, 4, generator=generator)
    assert not linear_applies(x, [w])  # fp32 without autocast
    assert torch.equal(linear(x, w), F.linear(x, w))
    odd = torch.randn(6, 5, generator=generator).bfloat16()
    assert not linear_applies(torch.randn(3, 5).bfloat16(), [odd])  # an odd reduction length
    assert not linear_applies(torch.randn(3, 4).bfloat16(), [torch.randn(5, 4).bfloat16()])  # odd rows
    assert not linear_applies(x.bfloat16(), [w.bfloat16()], backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp64 is not autocast's to round
        assert not linear_applies(x.double(), [w.double()])
        assert linear_applies(x, [w.bfloat16()])
    stacked = [torch.randn(5, 4, generator=generator).bfloat16() for _ in range(2)]
    assert torch.equal(linear(x.bfloat16(), stacked), F.linear(x.bfloat16(), torch.cat(stacked)))


@needs_kernels
def test_encoder_training_step_with_kernels_matches_torch():
    """A tiny BERT classifier under bf16 autocast on packed rows, dropout off: the loss and every gradient with
    fastcls's products (and its other kernels) as with PyTorch's ops, to bf16 accuracy."""
    encoded = encoded_rows([7, 1, 12, 4, 9], seed=3)
    results = []
    for kernels in (True, False):
        torch.manual_seed(0)
        config = AutoConfig.for_model("bert", vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                      pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model = EncoderClassifier(AutoModel.from_config(config), num_labels=3, dropout=0.0, packed=True,
                                  kernels=kernels).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kernels:
                first = model.body.layers[0]
                assert linear_applies(torch.ones(2, 32, dtype=torch.bfloat16), [first.query.weight])
            loss, _ = model(collate(encoded, [4, 2, 1, 0, 3], packed=True, pad_token_id=1, labels=True))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (ref_loss, ref_grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=0.02, atol=0.0)
    assert grads.keys() == ref_grads.keys() and any("attention.self.query" in n for n in grads)
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=0.0, atol=0.05 * scale + 1e-6, msg=name)


def test_registered_with_dispatch():
    backends = dispatch.op_backends()["linear"]
    assert backends["cuda"].backend in ("triton", "reference")
    assert backends["cpu"].backend in ("cpp", "reference")


@needs_kernels
def test_evaluation_packs_the_forward_layout_only(generator):
    """Under no_grad only the forward's packing is built (half the memory); a later training forward in the same
    pass builds the input gradient's packing when its backward first needs it."""
    w = bf16((96, 64), generator, 0.1).requires_grad_()
    x = bf16((70, 64), generator)
    with torch.no_grad():
        linear(x, w)
    packs = linear_module._packs_of((w,))
    assert packs.forward_packed is not None and packs.backward_packed is None
    x.requires_grad_()
    linear(x, w).sum().backward()
    assert packs.backward_packed is not None
    assert_bf16_product(x.grad, torch.ones(70, 96).double() @ w.detach().double(),
                        torch.ones(70, 96).double() @ w.detach().double().abs())


@needs_kernels
def test_results_do_not_depend_on_the_thread_count(generator):
    """Every output element and gradient sums in one fixed order, whatever the threads (a resumed run may have
    others): bitwise the same with 1 and 2 threads, the bias gradient's column sums included."""
    w = bf16((96, 64), generator, 0.1).requires_grad_()
    b = bf16(96, generator).requires_grad_()
    x = bf16((301, 64), generator).requires_grad_()
    grad = bf16((301, 96), generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = linear(x, w, b)
            results.append((y, *torch.autograd.grad(y, (x, w, b), grad)))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@needs_kernels
def test_a_forward_pass_reads_weights_changed_behind_their_version(generator):
    """`.data` in place bypasses the version counter: the next forward pass packs the weight again."""
    w = bf16((96, 64), generator, 0.1).requires_grad_()
    x = bf16((70, 64), generator)
    linear_module.new_forward_pass()
    before = linear(x, w)
    w.data.add_(1.0)
    assert torch.equal(linear(x, w), before)  # the premise: within one pass the packing stands
    linear_module.new_forward_pass()
    assert torch.equal(linear(x, w), linear(x, w.detach().clone()))
