"""Every cross-entropy backend against torch.nn.functional.cross_entropy computed in float64: loss and gradient,
every option (class weights, ignore_index, label smoothing) and reduction."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from fastcls.ops import cross_entropy, dispatch, op_backends

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Under the Triton interpreter each program costs ~0.4 ms per chunk, so interpreted runs get fewer rows; their
# "wide" rows still pass MAX_SINGLE_BLOCK, so the chunked kernel runs (test_wide_rows_interpreted has 37 x 50257).
SHAPES = {
    "small": {"compiled": (3, 423), "interpreted": (3, 423)},
    "two_classes": {"compiled": (64, 2), "interpreted": (5, 2)},
    "wide": {"compiled": (37, 50257), "interpreted": (3, 33000)},
}


def interpreted(backend) -> bool:
    name, device = backend
    return name == "triton" and device.type == "cpu"


def shape_for(size: str, backend) -> tuple[int, int]:
    return SHAPES[size]["interpreted" if interpreted(backend) else "compiled"]


def random_inputs(shape, dtype, device, generator):
    n_rows, n_classes = shape
    logits = (torch.randn(shape, generator=generator) * 3).to(dtype)
    target = torch.randint(0, n_classes, (n_rows,), generator=generator)
    return logits.to(device), target.to(device)


def random_upstream(reduction, n_rows, device, generator):
    """A non-unit gradient for the loss: a scalar for mean/sum, one per row for none."""
    if reduction == "none":
        return torch.randn(n_rows, generator=generator).to(device)
    return (torch.rand((), generator=generator) * 2 + 0.5).to(device)


def torch_float64(logits, target, upstream, *, reduction="mean", **options):
    """Loss and gradient from torch in float64; a mean over no kept rows is 0, as fastcls defines it."""
    x = logits.detach().double().requires_grad_()
    if options.get("weight") is not None:
        options["weight"] = options["weight"].double()
    loss = F.cross_entropy(x, target, reduction=reduction, **options)
    if reduction == "mean" and not (target != options.get("ignore_index", -100)).any():
        loss = (x * 0).sum()
    loss.backward(upstream.double())
    return loss.detach(), x.grad


def assert_close(actual, expected, tol):
    assert actual.shape == expected.shape
    error = (actual.detach().double().cpu() - expected.cpu()).norm()
    scale = expected.cpu().norm()
    assert torch.isfinite(actual).all()
    assert error <= tol * max(scale, 1e-30), f"relative error {error / scale:.3g} exceeds {tol:g}"


def check_against_torch(backend, logits, target, generator, *, reduction="mean", **options):
    name, device = backend
    upstream = random_upstream(reduction, logits.shape[0], device, generator)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, backend=name, reduction=reduction, **options)
    loss.backward(upstream)
    expected_loss, expected_grad = torch_float64(logits, target, upstream, reduction=reduction, **options)
    tol = TOLERANCE[logits.dtype]
    assert loss.dtype == torch.promote_types(logits.dtype, torch.float32)
    assert x.grad.dtype == logits.dtype
    assert_close(loss, expected_loss, tol)
    assert_close(x.grad, expected_grad, tol)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("size", list(SHAPES))
def test_matches_torch(backend, size, reduction, dtype, generator):
    logits, target = random_inputs(shape_for(size, backend), dtype, backend[1], generator)
    check_against_torch(backend, logits, target, generator, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15], ids=["no_smoothing", "smoothing"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_weight_and_label_smoothing(backend, weighted, smoothing, reduction, dtype, generator):
    """torch's weighted mean (divided by the kept rows' target weights) and its smoothing term (weighted by
    class), with some rows ignored; rows wider than a C++ chunk."""
    logits, target = random_inputs((7, 2500), dtype, backend[1], generator)
    target[torch.tensor([1, 5])] = -100
    weight = (torch.rand(2500, generator=generator) * 2 + 0.1).to(backend[1]) if weighted else None
    check_against_torch(backend, logits, target, generator, reduction=reduction, weight=weight,
                        label_smoothing=smoothing)


@pytest.mark.parametrize("ignore_index", [-100, 3], ids=["negative", "a_class"])
@pytest.mark.parametrize("ignored", ["some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "weighted_smoothed"])
def test_ignore_index(backend, options, reduction, ignored, ignore_index, generator):
    logits, target = random_inputs((6, 37), torch.float32, backend[1], generator)
    ignored_rows = torch.tensor([1, 4]) if ignored == "some" else torch.arange(6)
    target[ignored_rows.to(target.device)] = ignore_index
    extra = {}
    if options == "weighted_smoothed":
        extra = {"weight": (torch.rand(37, generator=generator) + 0.5).to(backend[1]), "label_smoothing": 0.2}
    if ignored == "all":
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, target, backend=backend[0], ignore_index=ignore_index, reduction=reduction, **extra)
        loss.sum().backward()
        assert torch.all(loss == 0) and torch.all(x.grad == 0)
    else:
        check_against_torch(backend, logits, target, generator, reduction=reduction, ignore_index=ignore_index,
                            **extra)


def test_wide_rows_interpreted(backend, generator):
    """The issue's odd shape 37 x 50257 on every backend, the Triton interpreter included (chunked rows)."""
    logits, target = random_inputs((37, 50257), torch.float32, backend[1], generator)
    target[5] = -100
    check_against_torch(backend, logits, target, generator, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_largest_vocabulary(backend, dtype, generator):
    """K = 262,144, the widest rows the issue asks for (many chunks on every kernel)."""
    logits, target = random_inputs((2, 262144), dtype, backend[1], generator)
    check_against_torch(backend, logits, target, generator, reduction="sum", label_smoothing=0.05)


def test_float64_runs_the_reference_math(backend, generator):
    logits, target = random_inputs((3, 423), torch.float64, backend[1], generator)
    check_against_torch(backend, logits, target, generator)


def test_masked_classes_get_zero_probability(backend, generator):
    """-inf logits (masked classes), in whole chunks and scattered: finite loss, zero gradient there."""
    logits, target = random_inputs((4, 5000), torch.float32, backend[1], generator)
    logits[:, :2100] = float("-inf")
    logits[:, 3000::7] = float("-inf")
    target = torch.randint(2100, 3000, (4,), generator=generator).to(backend[1])
    check_against_torch(backend, logits, target, generator)


@pytest.mark.parametrize("layout", ["row_padded", "transposed"])
def test_strided_logits(backend, layout, generator):
    n_rows, n_classes = 5, 300
    if layout == "row_padded":  # class stride 1, rows further apart than K
        storage = torch.randn(n_rows, n_classes + 17, generator=generator) * 3
        logits = storage[:, :n_classes]
    else:  # class stride != 1: the op has to make it contiguous
        logits = (torch.randn(n_classes, n_rows, generator=generator) * 3).t()
    target = torch.randint(0, n_classes, (n_rows,), generator=generator)
    check_against_torch(backend, logits.to(backend[1]), target.to(backend[1]), generator)


@pytest.mark.parametrize("bad_target", [7, -5], ids=["too_large", "negative"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_out_of_range_target_raises(backend, bad_target, requires_grad, generator):
    logits, target = random_inputs((4, 7), torch.float32, backend[1], generator)
    target[0] = -100
    target[2] = bad_target
    with pytest.raises(IndexError, match=rf"target {bad_target} in row 2 is outside \[0, 7\)"):
        cross_entropy(logits.requires_grad_(requires_grad), target, backend=backend[0])


def test_bad_arguments_name_themselves(backend, generator):
    logits, target = random_inputs((4, 7), torch.float32, backend[1], generator)
    with pytest.raises(ValueError, match="weight must have one entry per class"):
        cross_entropy(logits, target, weight=torch.ones(6, device=backend[1]), backend=backend[0])
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=1.5, backend=backend[0])
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, target, reduction="avg", backend=backend[0])
    with pytest.raises(ValueError, match="target must hold class indices"):
        cross_entropy(logits, target.float(), backend=backend[0])


def test_no_grad_forward_gives_the_same_loss(backend, generator):
    logits, target = random_inputs((5, 3000), torch.float32, backend[1], generator)
    with_grad = cross_entropy(logits.clone().requires_grad_(), target, backend=backend[0], label_smoothing=0.1)
    without = cross_entropy(logits, target, backend=backend[0], label_smoothing=0.1)
    assert torch.equal(with_grad.detach(), without)


def test_unit_upstream_gradient(backend, generator):
    """loss.backward() (upstream exactly 1: the kernels' gradient is used as is) against torch."""
    logits, target = random_inputs((6, 100), torch.float32, backend[1], generator)
    x = logits.clone().requires_grad_()
    cross_entropy(x, target, backend=backend[0]).backward()
    expected = torch_float64(logits, target, torch.tensor(1.0, device=backend[1]))[1]
    assert_close(x.grad, expected, 1e-5)


def test_summed_per_row_losses(backend, generator):
    """reduction="none" followed by .sum(): the upstream gradient arrives as one value broadcast to every row."""
    logits, target = random_inputs((6, 100), torch.float32, backend[1], generator)
    x = logits.clone().requires_grad_()
    (cross_entropy(x, target, backend=backend[0], reduction="none").sum() * 3).backward()
    expected = torch_float64(logits, target, torch.tensor(3.0, device=backend[1]), reduction="sum")[1]
    assert_close(x.grad, expected, 1e-5)


def test_gradient_does_not_alias_logits(backend, generator):
    logits, target = random_inputs((4, 33), torch.float32, backend[1], generator)
    logits.requires_grad_()
    before = logits.detach().clone()
    cross_entropy(logits, target, backend=backend[0]).backward()
    assert torch.equal(logits.detach(), before)
    assert logits.grad.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()


def test_inplace_grad_writes_over_the_logits(backend, generator):
    if backend[0] == "reference":
        pytest.skip("the reference has no in-place gradient")
    logits, target = random_inputs((5, 3000), torch.float32, backend[1], generator)
    expected = torch_float64(logits, target, torch.tensor(1.0, device=backend[1]))[1]
    leaf = logits.clone().requires_grad_()
    scores = leaf * 1.0  # a non-leaf whose producer (mul by a constant) saved nothing
    scores.retain_grad()
    cross_entropy(scores, target, backend=backend[0], inplace_grad=True).backward()
    assert torch.equal(scores.detach(), scores.grad)  # the logits' memory now holds their gradient
    assert_close(leaf.grad, expected, 1e-5)


def test_inplace_grad_is_refused_where_the_logits_were_saved(backend, generator):
    """Liger's silent corruption (its issues 272, 343): an op that saved the logits now raises instead."""
    if backend[0] == "reference":
        pytest.skip("the reference has no in-place gradient")
    logits, target = random_inputs((5, 300), torch.float32, backend[1], generator)
    leaf = logits.clone().requires_grad_()
    scores = leaf.exp()  # exp saves its output for its backward
    loss = cross_entropy(scores, target, backend=backend[0], inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_second_backward_is_refused(backend, generator):
    if backend[0] == "reference":
        pytest.skip("autograd itself handles the reference")
    logits, target = random_inputs((4, 33), torch.float32, backend[1], generator)
    loss = cross_entropy(logits.requires_grad_(), target, backend=backend[0])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already used by an earlier backward"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_chunked_kernel_with_narrow_blocks(backend, dtype, generator):
    """A chunk narrower than K makes the kernel loop, with a ragged last chunk; the scale kernel skips 1."""
    name, device = backend
    if name != "triton":
        pytest.skip("Triton launchers only")
    from fastcls.kernels.cross_entropy import (
        cross_entropy_rows_triton,
        scale_rows_triton,
    )

    logits, target = random_inputs((4, 3000), dtype, device, generator)
    target[1] = -100
    weight = (torch.rand(3000, generator=generator) + 0.5).to(device)
    grad = torch.empty_like(logits)
    loss_rows = cross_entropy_rows_triton(logits, target, weight, -100, 0.1, grad, torch.tensor(1.0, device=device),
                                          block_size=512)
    upstream = torch.randn(4, generator=generator).to(device)
    upstream[2] = 1.0
    scale_rows_triton(grad, upstream, block_size=512)
    expected_loss, expected_grad = torch_float64(logits, target, upstream, reduction="none", weight=weight,
                                                 label_smoothing=0.1)
    assert_close(loss_rows, expected_loss, 1e-5)
    assert_close(grad, expected_grad, TOLERANCE[dtype])


def _has_c_compiler() -> bool:
    return any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "c++", "g++"))


@pytest.mark.skipif(not _has_c_compiler(), reason="torch.compile's CPU backend needs a C compiler")
def test_torch_compile_gives_the_same_loss_and_gradient(backend, generator):
    if interpreted(backend):
        pytest.skip("the interpreter is covered by the eager tests")
    torch._dynamo.reset()
    logits, target = random_inputs((8, 50), torch.float32, backend[1], generator)
    target[3] = -100
    weight = (torch.rand(50, generator=generator) + 0.5).to(backend[1])

    def step(x):
        return cross_entropy(x * 1.5, target, weight=weight, label_smoothing=0.1, backend=backend[0])

    eager_x, compiled_x = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager = step(eager_x)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True)(compiled_x)
    compiled.backward()
    assert_close(compiled, eager.double(), 1e-6)
    assert_close(compiled_x.grad, eager_x.grad.double(), 1e-6)


def test_op_backends_names_a_backend_per_device():
    backends = op_backends()["cross_entropy"]
    assert set(backends) == {"cpu", "cuda"}
    assert {choice.backend for choice in backends.values()} <= set(dispatch.BACKENDS)
