"""linear_cross_entropy on every backend against F.linear + F.cross_entropy in float64: loss and the gradients of
input, weight and bias, over several chunks; no [N, K] tensor is ever allocated."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastcls.ops import linear_cross_entropy

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def random_problem(n_rows, dim, n_classes, dtype, device, generator, *, bias=True):
    x = torch.randn(n_rows, dim, generator=generator).to(dtype)
    w = (torch.randn(n_classes, dim, generator=generator) * dim**-0.5 * 3).to(dtype)
    b = (torch.randn(n_classes, generator=generator) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, n_classes, (n_rows,), generator=generator)
    return x.to(device), w.to(device), None if b is None else b.to(device), target.to(device)


def assert_close(actual, expected, tol):
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    error = (actual.detach().double().cpu() - expected.cpu()).norm()
    scale = expected.cpu().norm()
    assert error <= tol * max(scale, 1e-30), f"relative error {error / scale:.3g} exceeds {tol:g}"


def run(fn, x, w, b, target, upstream, **options):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + (() if b is None else (b,))]
    loss = fn(leaves[0], leaves[1], target, leaves[2] if b is not None else None, **options)
    loss.backward(upstream)
    return loss.detach(), [leaf.grad for leaf in leaves]


def torch_float64(x, w, b, target, upstream, **options):
    if options.get("weight") is not None:
        options["weight"] = options["weight"].double()

    def fn(x, w, target, b, **options):
        return F.cross_entropy(F.linear(x, w, b), target, **options)

    return run(fn, x.double(), w.double(), None if b is None else b.double(), target, upstream.double(), **options)


def fastcls_run(backend, x, w, b, target, upstream, **options):
    def fn(x, w, target, b, **options):
        return linear_cross_entropy(x, w, target, linear_bias=b, backend=backend, **options)

    return run(fn, x, w, b, target, upstream, **options)


def upstream_for(reduction, n_rows, device, generator):
    if reduction == "none":
        return torch.randn(n_rows, generator=generator).to(device)
    return (torch.rand((), generator=generator) * 2 + 0.5).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "no_bias", "weighted_smoothed_ignored"])
def test_matches_torch(backend, options, reduction, dtype, generator):
    name, device = backend
    x, w, b, target = random_problem(37, 24, 423, dtype, device, generator, bias=options != "no_bias")
    extra = {"reduction": reduction}
    if options == "weighted_smoothed_ignored":
        target[torch.tensor([0, 9, 30])] = -100
        extra.update(weight=(torch.rand(423, generator=generator) + 0.5).to(device), label_smoothing=0.1)
    upstream = upstream_for(reduction, 37, device, generator)
    loss, grads = fastcls_run(name, x, w, b, target, upstream, chunk_size=8, **extra)
    expected_loss, expected_grads = torch_float64(x, w, b, target, upstream, **extra)
    tol = TOLERANCE[dtype]
    assert loss.dtype == torch.float32
    assert_close(loss, expected_loss, tol)
    for grad, expected, leaf in zip(grads, expected_grads, (x, w, b)):
        assert grad.dtype == leaf.dtype
        assert_close(grad, expected, tol)


def test_all_rows_ignored_gives_zero_loss_and_gradients(backend, generator):
    name, device = backend
    x, w, b, target = random_problem(10, 8, 50, torch.float32, device, generator)
    target[:] = -100
    loss, grads = fastcls_run(name, x, w, b, target, torch.tensor(1.0, device=device), chunk_size=4)
    assert loss.item() == 0.0
    assert all(torch.all(grad == 0) for grad in grads)


def test_only_what_requires_grad_gets_one(backend, generator):
    name, device = backend
    x, w, b, target = random_problem(10, 8, 50, torch.float32, device, generator)
    x.requires_grad_()
    loss = linear_cross_entropy(x, w, target, linear_bias=b, backend=name)
    loss.backward()
    assert x.grad is not None and w.grad is None and b.grad is None
    expected = torch_float64(x, w, b, target, torch.tensor(1.0, device=device))
    assert_close(loss, expected[0], 1e-5)
    assert_close(x.grad, expected[1][0], 1e-5)


class _LargestAllocation(TorchDispatchMode):
    """Records the most bytes any single op output held while the mode was active (bytes, since the Triton
    interpreter moves buffers around as byte views)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return out


def test_never_materialises_the_logits(backend, generator):
    name, device = backend
    if name == "reference":
        pytest.skip("the reference is F.linear + cross_entropy, which does materialise them")
    n_rows, dim, n_classes, chunk = 64, 8, 300, 16
    x, w, b, target = random_problem(n_rows, dim, n_classes, torch.float32, device, generator)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with _LargestAllocation() as mode:
        loss = linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], backend=name,
                                    chunk_size=chunk)
        loss.backward()
    assert mode.largest <= chunk * n_classes * 4 < n_rows * n_classes * 4
    assert all(leaf.grad is not None for leaf in leaves)


def test_matches_torchs_own_linear_cross_entropy(generator):
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch < 2.13 has no F.linear_cross_entropy")
    x, w, b, target = random_problem(40, 16, 200, torch.float32, "cpu", generator)
    target[3] = -100
    weight = torch.rand(200, generator=generator) + 0.5
    options = {"linear_bias": b, "weight": weight, "label_smoothing": 0.05}
    expected = F.linear_cross_entropy(x, w, target, **options)
    assert_close(linear_cross_entropy(x, w, target, **options), expected.double(), 1e-5)


def test_autocast_runs_the_products_in_bf16(backend, generator):
    name, device = backend
    x, w, b, target = random_problem(20, 16, 100, torch.float32, device, generator)
    upstream = torch.tensor(1.0, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, grads = fastcls_run(name, x, w, b, target, upstream, chunk_size=8)
    expected_loss, expected_grads = torch_float64(x.bfloat16(), w.bfloat16(), b.bfloat16(), target, upstream)
    assert loss.dtype == torch.float32
    assert_close(loss, expected_loss, 1e-2)
    for grad, expected in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        assert_close(grad, expected, 1e-2)


def test_out_of_range_target_raises(backend, generator):
    name, device = backend
    x, w, b, target = random_problem(6, 8, 10, torch.float32, device, generator)
    target[4] = 10
    with pytest.raises(IndexError, match=r"target 10 in row 4 is outside \[0, 10\)"):
        linear_cross_entropy(x, w, target, linear_bias=b, backend=name)


def test_bad_shapes_name_the_argument(generator):
    x, w, b, target = random_problem(6, 8, 10, torch.float32, "cpu", generator)
    with pytest.raises(ValueError, match="linear_weight must be"):
        linear_cross_entropy(x, w.t(), target)
    with pytest.raises(ValueError, match="linear_bias must be"):
        linear_cross_entropy(x, w, target, linear_bias=b[:5])


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")), reason="inductor needs a C compiler")
def test_torch_compile_gives_the_same_loss_and_gradients(backend, generator):
    name, device = backend
    if name == "reference" or (name == "triton" and device.type == "cpu"):
        pytest.skip("the kernels only: the reference is plain torch ops, the interpreter is covered eagerly")
    torch._dynamo.reset()
    x, w, b, target = random_problem(12, 8, 30, torch.float32, device, generator)

    def step(x, w, b):
        return linear_cross_entropy(torch.tanh(x), w, target, linear_bias=b, label_smoothing=0.1, backend=name,
                                    chunk_size=5)

    eager_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    compiled_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    eager = step(*eager_leaves)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True)(*compiled_leaves)
    compiled.backward()
    assert_close(compiled, eager.double(), 1e-6)
    for compiled_leaf, eager_leaf in zip(compiled_leaves, eager_leaves):
        assert_close(compiled_leaf.grad, eager_leaf.grad.double(), 1e-6)
