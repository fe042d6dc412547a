"""Fused dropout + residual add + LayerNorm (and LayerNorm + dropout): torch's unfused functions where no dropout
applies, the reference with the reconstructed mask otherwise (values and gradients, fp32 and bf16, odd shapes),
the mask's statistics, the one mask every backend draws, and what the backward keeps."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastcls.ops import (
    dispatch,
    dropout_add_layer_norm,
    dropout_add_layer_norm_reference,
    layer_norm_dropout,
    layer_norm_dropout_reference,
    op_backends,
)
from fastcls.ops import cpp
from fastcls.ops.dropout import keep_mask, keep_threshold, kept_scale

SHAPES = [(7, 33), (5, 769), (2, 3, 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def interpreted(backend) -> bool:
    name, device = backend
    return name == "triton" and device.type == "cpu"


def randn(shape, generator, device, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift).to(dtype).to(device)


def layer_norm_params(hidden, generator, device, dtype=torch.float32):
    weight = randn((hidden,), generator, device, dtype, scale=0.3, shift=1.0).requires_grad_()
    bias = randn((hidden,), generator, device, dtype, scale=0.1).requires_grad_()
    return weight, bias


def grads(out, inputs, upstream):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], upstream)


def assert_close_to(got, expected, dtype, what):
    # bf16: one rounding of an fp32 result (a whole ulp under the interpreter, which truncates), plus the
    # recovery of xhat from the bf16 output, whose rounding error the backward amplifies a little
    if dtype == torch.float32:
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-5, rtol=2e-5, msg=what)
    else:
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(got.float(), expected.float(), atol=2e-2 * scale, rtol=2e-2, msg=what)


@pytest.mark.parametrize("shape", [(7, 33), (4, 128)], ids=str)
def test_no_dropout_is_torch_unfused(backend, shape, generator):
    """p = 0, and any p when not training: exactly F.layer_norm(x + residual) within fp32 rounding, gradients
    included."""
    name, device = backend
    x, residual = (randn(shape, generator, device).requires_grad_() for _ in range(2))
    weight, bias = layer_norm_params(shape[-1], generator, device)
    upstream = randn(shape, generator, device)
    expected = F.layer_norm(x + residual, shape[-1:], weight, bias, 1e-5)
    expected_grads = grads(expected, (x, residual, weight, bias), upstream)
    for p, training in ((0.0, True), (0.7, False)):
        out = dropout_add_layer_norm(x, residual, weight, bias, p, eps=1e-5, training=training, backend=name)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads(out, (x, residual, weight, bias), upstream), expected_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    expected = F.layer_norm(x, shape[-1:], weight, bias, 1e-5)
    expected_grads = grads(expected, (x, weight, bias), upstream)
    out = layer_norm_dropout(x, weight, bias, 0.4, eps=1e-5, training=False, backend=name)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(out, (x, weight, bias), upstream), expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [*DTYPES.values(), torch.float16], ids=[*DTYPES, "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
def test_dropout_add_layer_norm_matches_the_reference_mask(backend, shape, dtype, with_residual, generator):
    name, device = backend
    x = randn(shape, generator, device, dtype).requires_grad_()
    residual = randn(shape, generator, device, dtype).requires_grad_() if with_residual else None
    weight, bias = layer_norm_params(shape[-1], generator, device, dtype)
    upstream = randn(shape, generator, device, dtype)
    seed, p = 0x0123_4567_89AB_CDEF, 0.3
    out = dropout_add_layer_norm(x, residual, weight, bias, p, seed=seed, backend=name)
    expected = dropout_add_layer_norm_reference(x, residual, weight, bias, p, 1e-12, seed)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to(out, expected, dtype, "output")
    inputs = (x, residual, weight, bias)
    got_grads, expected_grads = grads(out, inputs, upstream), grads(expected, inputs, upstream)
    for what, got, want in zip(("x", "residual", "weight", "bias")[:len(got_grads)], got_grads, expected_grads):
        assert got.dtype == want.dtype
        assert_close_to(got, want, dtype, f"grad {what}")
    # the backward redrew the forward's mask: the gradient of x is 0 exactly where the mask drops
    assert torch.equal(got_grads[0] != 0, keep_mask(shape, p, seed, device))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dropout_after", [False, True], ids=["dropout-add-norm", "norm-dropout"])
def test_cpp_rows_worked_on_together_match_each_row_alone(dtype, p, dropout_after, generator):
    # The AVX-512 kernels work on bf16 rows in pairs, one row alone at the end (csrc/layer_norm.cpp): every row,
    # paired or not, gets exactly the values and gradients it gets from a call over itself alone, whose mask
    # starts at the row's first counter.
    if dispatch.cpp_ext is None:
        pytest.skip("C++ kernels not built")
    n_rows, hidden, seed = 7, 40, 11
    x, residual, upstream = (randn((n_rows, hidden), generator, "cpu", dtype) for _ in range(3))
    residual = None if dropout_after else residual
    weight, bias = (t.detach() for t in layer_norm_params(hidden, generator, "cpu"))

    def run(rows, counter_offset):
        """(output, grad x, grad residual) of the kernels over x[rows]."""
        n = rows.stop - rows.start
        out, grad_x = torch.empty((n, hidden), dtype=dtype), torch.empty((n, hidden), dtype=dtype)
        grad_residual = None if dropout_after else torch.empty((n, hidden), dtype=dtype)
        mean, rstd = torch.empty(n), torch.empty(n)
        drop = (seed, counter_offset, keep_threshold(p), kept_scale(p), dropout_after)
        cpp.layer_norm_forward(x[rows], None if residual is None else residual[rows], weight, bias, out, None, mean,
                               rstd, 1e-12, *drop)
        saved = x[rows] if dropout_after else out
        cpp.layer_norm_backward(upstream[rows], saved, not dropout_after, weight, bias, mean, rstd, None, grad_x,
                                grad_residual, *drop)
        return out, grad_x, grad_residual

    together = run(slice(0, n_rows), 0)
    for row in range(n_rows):
        alone = run(slice(row, row + 1), row * hidden // 4)
        for what, got, want in zip(("output", "grad x", "grad residual"), together, alone):
            if want is not None:
                assert torch.equal(got[row:row + 1], want), f"row {row}: {what}"


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dropout_after", [False, True], ids=["dropout-add-norm", "norm-dropout"])
@pytest.mark.parametrize("keep_sum", [False, True], ids=["", "sum"])
@pytest.mark.parametrize("n_rows", [9, (32 << 20) // (3 * 1024 * 4) + 3], ids=["rows", "streamed"])
def test_cpp_bf16_copy_is_the_output_rounded(p, dropout_after, keep_sum, n_rows, generator):
    # out_bf16: the fp32 output rounded to bf16 as torch rounds it, written by the same pass (streamed too), the
    # output, sum and statistics unchanged by asking for it
    if dispatch.cpp_ext is None:
        pytest.skip("C++ kernels not built")
    hidden = 50 if n_rows == 9 else 1024  # a tail step in each row; the streamed size's rows are whole lines
    x, residual = (randn((n_rows, hidden), generator, "cpu", scale=3.0) for _ in range(2))
    residual = None if dropout_after else residual
    weight, bias = (t.detach() for t in layer_norm_params(hidden, generator, "cpu"))

    def run(out_bf16):
        out = torch.empty((n_rows, hidden))
        summed = torch.empty((n_rows, hidden)) if keep_sum else None
        mean, rstd = torch.empty(n_rows), torch.empty(n_rows)
        cpp.layer_norm_forward(x, residual, weight, bias, out, summed, mean, rstd, 1e-12, 3, 8, keep_threshold(p),
                               kept_scale(p), dropout_after, out_bf16)
        return out, summed, mean, rstd

    copy = torch.full((n_rows, hidden), float("nan"), dtype=torch.bfloat16)
    with_copy, without = run(copy), run(None)
    assert torch.equal(copy.view(torch.int16), with_copy[0].to(torch.bfloat16).view(torch.int16))
    for got, want in zip(with_copy, without):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_cpp_streamed_outputs_match_the_reference(dtype, generator):
    # Calls touching more than 32 MiB store their outputs non-temporally (csrc/layer_norm.cpp): a shape past that.
    if dispatch.cpp_ext is None:
        pytest.skip("C++ kernels not built")
    device, hidden = torch.device("cpu"), 1024
    n_rows = (32 << 20) // (3 * hidden * torch.finfo(dtype).bits // 8) + 3
    x, residual = (randn((n_rows, hidden), generator, device, dtype).requires_grad_() for _ in range(2))
    weight, bias = layer_norm_params(hidden, generator, device, dtype)
    upstream = randn((n_rows, hidden), generator, device, dtype)
    out = dropout_add_layer_norm(x, residual, weight, bias, 0.1, seed=5, backend="cpp")
    expected = dropout_add_layer_norm_reference(x, residual, weight, bias, 0.1, 1e-12, 5)
    assert_close_to(out, expected, dtype, "output")
    inputs = (x, residual, weight, bias)
    for what, got, want in zip(("x", "residual", "weight", "bias"), grads(out, inputs, upstream),
                               grads(expected, inputs, upstream)):
        assert_close_to(got, want, dtype, f"grad {what}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_dropout_matches_the_reference_mask(backend, shape, dtype, generator):
    name, device = backend
    x = randn(shape, generator, device, dtype, scale=2.0, shift=0.5).requires_grad_()
    weight, bias = layer_norm_params(shape[-1], generator, device, dtype)
    upstream = randn(shape, generator, device, dtype)
    seed, p = 77, 0.25
    out = layer_norm_dropout(x, weight, bias, p, seed=seed, backend=name)
    expected = layer_norm_dropout_reference(x, weight, bias, p, 1e-12, seed)
    assert torch.equal(out != 0, keep_mask(shape, p, seed, device))
    assert_close_to(out, expected, dtype, "output")
    for what, got, want in zip(("x", "weight", "bias"), grads(out, (x, weight, bias), upstream),
                               grads(expected, (x, weight, bias), upstream)):
        assert_close_to(got, want, dtype, f"grad {what}")


def test_same_seed_same_mask_fresh_seed_per_call(backend, generator):
    name, device = backend
    shape = (6, 40)
    x = randn(shape, generator, device).requires_grad_()
    weight, bias = layer_norm_params(40, generator, device)
    first = dropout_add_layer_norm(x, None, weight, bias, 0.5, seed=9, backend=name)
    assert torch.equal(first, dropout_add_layer_norm(x, None, weight, bias, 0.5, seed=9, backend=name))
    assert not torch.equal(first, dropout_add_layer_norm(x, None, weight, bias, 0.5, seed=10, backend=name))
    assert not torch.equal(dropout_add_layer_norm(x, None, weight, bias, 0.5, backend=name),
                           dropout_add_layer_norm(x, None, weight, bias, 0.5, backend=name))
    torch.manual_seed(123)
    out = dropout_add_layer_norm(x, None, weight, bias, 0.5, backend=name)
    torch.manual_seed(123)
    again = dropout_add_layer_norm(x, None, weight, bias, 0.5, backend=name)
    assert torch.equal(out, again)
    # and the backward of each redraws its own forward's mask
    (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    (grad_again,) = torch.autograd.grad(again, x, torch.ones_like(out))
    assert torch.equal(grad_x, grad_again)


def test_p_one_drops_all_of_x(backend, generator):
    name, device = backend
    x, residual = (randn((3, 20), generator, device).requires_grad_() for _ in range(2))
    weight, bias = layer_norm_params(20, generator, device)
    out = dropout_add_layer_norm(x, residual, weight, bias, 1.0, backend=name)
    torch.testing.assert_close(out, F.layer_norm(residual, (20,), weight, bias, 1e-12), atol=1e-5, rtol=1e-5)
    grad_x, grad_residual = torch.autograd.grad(out, (x, residual), torch.ones_like(out))
    assert torch.equal(grad_x, torch.zeros_like(x)) and grad_residual.abs().sum() > 0
    post = layer_norm_dropout(x, weight, bias, 1.0, backend=name)
    assert torch.equal(post, torch.zeros_like(post))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_and_kept_scale(backend, p):
    if interpreted(backend):
        pytest.skip("10^6 elements under the interpreter take minutes; it draws the reference's mask bit for bit")
    name, device = backend
    if name == "reference" and p != 0.5:
        pytest.skip("the reference draws keep_mask itself (whose rate test_dropout checks); one p is enough")
    generator = torch.Generator().manual_seed(4)
    shape = (1000, 1000)
    x = randn(shape, generator, device)
    zeros = torch.zeros(shape, device=device)
    ones, no_bias = torch.ones(1000, device=device), torch.zeros(1000, device=device)
    _, summed = dropout_add_layer_norm(x, zeros, ones, no_bias, p, seed=31, return_sum=True, backend=name)
    out = layer_norm_dropout(x, ones, no_bias, p, seed=31, backend=name)
    for dropped in (summed == 0, out == 0):
        rate = dropped.double().mean().item()
        assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / x.numel())
    keep = summed != 0
    assert torch.equal(out != 0, keep)  # both orders draw the mask over the same flat index
    scale = torch.tensor(kept_scale(p), dtype=torch.float32)
    assert torch.equal(summed[keep], x[keep] * scale)
    normalised = layer_norm_dropout(x, ones, no_bias, 0.0, backend=name)
    assert torch.equal(out[keep], normalised[keep] * scale)


@pytest.mark.parametrize("order", ["dropout_add_layer_norm", "layer_norm_dropout", "return_sum"])
def test_gradcheck_float64(backend, order, generator):
    name, device = backend
    x, residual = (randn((2, 7), generator, device, torch.float64).requires_grad_() for _ in range(2))
    weight, bias = layer_norm_params(7, generator, device, torch.float64)
    if order == "dropout_add_layer_norm":
        def fn(x, residual, weight, bias):
            return dropout_add_layer_norm(x, residual, weight, bias, 0.4, eps=1e-5, seed=5, backend=name)
    elif order == "return_sum":
        def fn(x, residual, weight, bias):
            out, summed = dropout_add_layer_norm(x, residual, weight, bias, 0.4, eps=1e-5, seed=5, backend=name,
                                                 return_sum=True)
            return out, summed * summed
    else:
        def fn(x, residual, weight, bias):
            return layer_norm_dropout(x + residual, weight, bias, 0.4, eps=1e-5, seed=5, backend=name)
    assert torch.autograd.gradcheck(fn, (x, residual, weight, bias))


def test_cpp_and_triton_draw_the_same_mask(generator):
    """Same seed and shape: the C++ kernels, the Triton kernels under the interpreter and on CUDA agree (a run is
    reproducible across devices)."""
    kernels = []
    if dispatch.cpp_ext is not None:
        kernels.append(("cpp", torch.device("cpu")))
    for device in (torch.device("cpu"), torch.device("cuda")):
        if (device.type == "cpu" or torch.cuda.is_available()) and dispatch.triton_usable(device):
            kernels.append(("triton", device))
    if len(kernels) < 2:
        pytest.skip(f"needs two kernel backends, have {kernels}")
    for shape in ((5, 33), (3, 64), (2, 8191)):
        x, residual, upstream = (randn(shape, generator, "cpu") for _ in range(3))
        weight, bias = layer_norm_params(shape[-1], generator, "cpu")
        results = []
        for name, device in kernels:
            inputs = [t.detach().to(device).requires_grad_() for t in (x, residual, weight, bias)]
            out = dropout_add_layer_norm(*inputs, 0.35, seed=2**40 + 3, backend=name)
            post = layer_norm_dropout(inputs[0], *inputs[2:], 0.35, seed=2**40 + 3, backend=name)
            results.append([t.cpu() for t in (out, post, *grads(out, inputs, upstream.to(device)))])
        for other in results[1:]:
            for first, second in zip(results[0], other):
                assert torch.equal(first == 0, second == 0)
                torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)


def saved_storages(fn):
    """Runs fn under a saved-tensors hook; returns {storage address: bytes} of what autograd keeps."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return saved, result


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_keeps_only_the_output_and_row_statistics(backend, dtype, generator):
    name, device = backend
    if name == "reference":
        pytest.skip("the reference is differentiated by autograd, which saves the mask")
    shape = (16, 48)
    x, residual = (randn(shape, generator, device, dtype).requires_grad_() for _ in range(2))
    weight, bias = layer_norm_params(48, generator, device, dtype)
    if device.type == "cuda":
        # the first call on CUDA starts the weight check behind the GPU's work and saves the sum meanwhile
        dropout_add_layer_norm(x, residual, weight, bias, 0.5, backend=name)
        torch.cuda.synchronize()
    saved, out = saved_storages(lambda: dropout_add_layer_norm(x, residual, weight, bias, 0.5, backend=name))
    out_storage = out.untyped_storage().data_ptr()
    parameters = {weight.untyped_storage().data_ptr(), bias.untyped_storage().data_ptr()}
    extra = sum(size for ptr, size in saved.items() if ptr != out_storage and ptr not in parameters)
    assert extra == 2 * 16 * 4  # fp32 mean and rstd per row, nothing of the size of x
    torch_saved, _ = saved_storages(lambda: F.layer_norm(F.dropout(x, 0.5) + residual, (48,), weight, bias))
    assert sum(torch_saved.values()) >= extra + x.numel() * (1 + x.element_size())  # mask and pre-norm sum


@pytest.mark.parametrize("column", ["zero weight", "large bias"])
def test_columns_the_output_cannot_recover_fall_back_to_the_sum(backend, column, generator):
    """xhat = (y - bias) / weight is lost where weight is 0 and inaccurate where |bias| >> |weight|: the op then
    keeps the pre-norm sum, and the gradients stay right."""
    name, device = backend
    shape = (6, 20)
    x, residual = (randn(shape, generator, device).requires_grad_() for _ in range(2))
    weight, bias = layer_norm_params(20, generator, device)
    with torch.no_grad():
        if column == "zero weight":
            weight[3] = 0.0
        else:
            weight[3], bias[3] = 1e-4, 5.0
    upstream = randn(shape, generator, device)
    saved, out = saved_storages(lambda: dropout_add_layer_norm(x, residual, weight, bias, 0.2, seed=1, backend=name))
    expected = dropout_add_layer_norm_reference(x, residual, weight, bias, 0.2, 1e-12, 1)
    for got, want in zip(grads(out, (x, residual, weight, bias), upstream),
                         grads(expected, (x, residual, weight, bias), upstream)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    if name != "reference":
        assert out.untyped_storage().data_ptr() not in saved


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_the_cpp_recovery_check_answers_as_torchs(dtype, generator):
    """The CPU's check (C++) and the device's (torch ops) agree column by column: at the bias bound, past it, a
    zero, infinite or NaN weight, a NaN bias."""
    if dispatch.cpp_ext is None:
        pytest.skip("C++ kernels not built")
    from fastcls.ops.layer_norm_recovery import MAX_BIAS_OVER_WEIGHT, _recoverable, _recoverable_flag

    for value in (None, 0.0, -0.0, float("inf"), float("nan"), "bound", "past", "nan bias"):
        weight, bias = (t.detach() for t in layer_norm_params(20, generator, "cpu", dtype))
        if value == "bound":
            bias[5] = -MAX_BIAS_OVER_WEIGHT * weight[5].float()
        elif value == "past":
            bias[5] = MAX_BIAS_OVER_WEIGHT * weight[5].float() * 1.02
        elif value == "nan bias":
            bias[5] = float("nan")
        elif value is not None:
            weight[5] = value
        assert _recoverable(weight, bias) == bool(_recoverable_flag(weight, bias)), value
        assert _recoverable(weight, bias) == (value in (None, "bound")), value


def test_return_sum_gives_the_pre_norm_sum(backend, generator):
    name, device = backend
    shape = (4, 36)
    x, residual = (randn(shape, generator, device).requires_grad_() for _ in range(2))
    weight, bias = layer_norm_params(36, generator, device)
    out, summed = dropout_add_layer_norm(x, residual, weight, bias, 0.3, seed=8, return_sum=True, backend=name)
    keep = keep_mask(shape, 0.3, 8, device)
    scale = torch.tensor(kept_scale(0.3), dtype=torch.float32)
    torch.testing.assert_close(summed, torch.where(keep, x * scale, 0.0) + residual, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, F.layer_norm(summed, (36,), weight, bias, 1e-12), atol=1e-5, rtol=1e-5)


def test_autocast_gives_fp32_like_torch(backend, generator):
    """Under autocast torch runs layer_norm in fp32, so the transformer blocks' outputs are fp32: so is the op's."""
    name, device = backend
    x = randn((5, 24), generator, device, torch.bfloat16)
    residual = randn((5, 24), generator, device)
    weight, bias = layer_norm_params(24, generator, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        expected = F.layer_norm(x + residual, (24,), weight, bias, 1e-12)
        out = dropout_add_layer_norm(x, residual, weight, bias, 0.1, training=False, backend=name)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_naming_the_argument():
    x, weight, bias = torch.randn(3, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="residual"):
        dropout_add_layer_norm(x, torch.randn(3, 9), weight, bias, 0.1)
    with pytest.raises(ValueError, match="weight"):
        dropout_add_layer_norm(x, None, torch.ones(9), bias, 0.1)
    with pytest.raises(ValueError, match="bias"):
        layer_norm_dropout(x, weight, None, 0.1)
    with pytest.raises(ValueError, match="hidden size"):
        layer_norm_dropout(torch.randn(1, 8193), torch.ones(8193), torch.zeros(8193), 0.1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout_add_layer_norm(x, None, weight, bias, 1.5)


def test_op_backends_lists_the_fused_ops():
    backends = op_backends()
    assert {"dropout_add_layer_norm", "layer_norm_dropout"} <= set(backends)
