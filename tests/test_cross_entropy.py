"""Every cross-entropy backend against torch.nn.functional.cross_entropy computed in float64: loss and gradient."""

import pytest
import torch
import torch.nn.functional as F

from fastcls.ops import cross_entropy, dispatch, op_backends

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}

# Under the Triton interpreter each program costs ~0.4 ms, so interpreted runs get fewer and narrower rows.
SHAPES = {
    "small": {"compiled": (3, 423), "interpreted": (3, 423)},
    "two_classes": {"compiled": (64, 2), "interpreted": (5, 2)},
    "wide": {"compiled": (37, 50257), "interpreted": (4, 3000)},
}


def shape_for(size: str, backend) -> tuple[int, int]:
    name, device = backend
    return SHAPES[size]["interpreted" if name == "triton" and device.type == "cpu" else "compiled"]


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


def torch_float64(logits, target, ignore_index, reduction, upstream):
    """Loss and gradient from torch in float64; a mean over no kept rows is 0, as fastcls defines it."""
    x = logits.detach().double().requires_grad_()
    loss_rows = F.cross_entropy(x, target, ignore_index=ignore_index, reduction="none")
    kept = (target != ignore_index).sum().clamp_min(1)
    loss = {"none": loss_rows, "sum": loss_rows.sum(), "mean": loss_rows.sum() / kept}[reduction]
    loss.backward(upstream.double())
    return loss.detach(), x.grad


def fastcls_loss_and_grad(backend_name, logits, target, upstream, **kwargs):
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, backend=backend_name, **kwargs)
    loss.backward(upstream)
    return loss.detach(), x.grad


def assert_close(actual, expected, tol):
    assert actual.shape == expected.shape
    error = (actual.detach().double().cpu() - expected.cpu()).norm()
    scale = expected.cpu().norm()
    assert error <= tol * scale, f"relative error {error / scale:.3g} exceeds {tol:g}"


def check_against_torch(backend, logits, target, reduction, generator, ignore_index=-100):
    name, device = backend
    upstream = random_upstream(reduction, logits.shape[0], device, generator)
    loss, grad = fastcls_loss_and_grad(name, logits, target, upstream, ignore_index=ignore_index, reduction=reduction)
    expected_loss, expected_grad = torch_float64(logits, target, ignore_index, reduction, upstream)
    tol = TOLERANCE[logits.dtype]
    assert loss.dtype == torch.promote_types(logits.dtype, torch.float32)
    assert grad.dtype == logits.dtype
    assert_close(loss, expected_loss, tol)
    assert_close(grad, expected_grad, tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("size", list(SHAPES))
def test_matches_torch(backend, size, reduction, dtype, generator):
    logits, target = random_inputs(shape_for(size, backend), dtype, backend[1], generator)
    check_against_torch(backend, logits, target, reduction, generator)


@pytest.mark.parametrize("ignore_index", [-100, 3], ids=["negative", "a_class"])
@pytest.mark.parametrize("ignored", ["some", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignore_index(backend, reduction, ignored, ignore_index, generator):
    logits, target = random_inputs((6, 37), torch.float32, backend[1], generator)
    ignored_rows = torch.tensor([1, 4]) if ignored == "some" else torch.arange(6)
    target[ignored_rows.to(target.device)] = ignore_index
    check_against_torch(backend, logits, target, reduction, generator, ignore_index=ignore_index)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_other_dtypes(backend, dtype, generator):
    """Dtypes a kernel does not take run on the reference path, with the same results."""
    logits, target = random_inputs((3, 423), dtype, backend[1], generator)
    check_against_torch(backend, logits, target, "mean", generator)


@pytest.mark.parametrize("layout", ["row_padded", "transposed"])
def test_strided_logits(backend, layout, generator):
    n_rows, n_classes = 5, 300
    if layout == "row_padded":  # class stride 1, rows further apart than K
        storage = torch.randn(n_rows, n_classes + 17, generator=generator) * 3
        logits = storage[:, :n_classes]
    else:  # class stride != 1: the op has to make it contiguous
        logits = (torch.randn(n_classes, n_rows, generator=generator) * 3).t()
    target = torch.randint(0, n_classes, (n_rows,), generator=generator)
    check_against_torch(backend, logits.to(backend[1]), target.to(backend[1]), "mean", generator)


@pytest.mark.parametrize("bad_target", [7, -5], ids=["too_large", "negative"])
def test_out_of_range_target_raises(backend, bad_target, generator):
    logits, target = random_inputs((4, 7), torch.float32, backend[1], generator)
    target[0] = -100
    target[2] = bad_target
    with pytest.raises(IndexError, match=rf"target {bad_target} in row 2 is outside \[0, 7\)"):
        cross_entropy(logits, target, backend=backend[0])


def test_gradient_does_not_alias_logits(backend, generator):
    logits, target = random_inputs((4, 33), torch.float32, backend[1], generator)
    logits.requires_grad_()
    before = logits.detach().clone()
    cross_entropy(logits, target, backend=backend[0]).backward()
    assert torch.equal(logits.detach(), before)
    assert logits.grad.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_launchers_loop_over_chunks(backend, dtype, generator):
    """A chunk narrower than K makes the kernels loop, with a ragged last chunk."""
    name, device = backend
    if name != "triton":
        pytest.skip("Triton launchers only")
    from fastcls.kernels.cross_entropy import cross_entropy_backward_triton, cross_entropy_forward_triton

    logits, target = random_inputs((4, 3000), dtype, device, generator)
    target[1] = -100
    loss_rows, lse = cross_entropy_forward_triton(logits, target, -100, block_size=512)
    scale_rows = torch.randn(4, generator=generator).to(device)
    scale_rows[1] = 0.0
    grad = cross_entropy_backward_triton(logits, target, lse, scale_rows, block_size=512)
    expected_loss, expected_grad = torch_float64(logits, target, -100, "none", scale_rows)
    kept = target != -100
    assert_close(loss_rows, expected_loss, 1e-5)
    assert_close(lse[kept], torch.logsumexp(logits.double(), dim=1)[kept], 1e-5)
    assert grad.dtype == dtype
    assert_close(grad, expected_grad, TOLERANCE[dtype])


def test_op_backends_names_a_backend_per_device():
    backends = op_backends()["cross_entropy"]
    assert set(backends) == {"cpu", "cuda"}
    assert set(backends.values()) <= set(dispatch.BACKENDS)
