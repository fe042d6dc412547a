"""The cross-entropy family as torch.library custom ops: their schemas, opcheck on every op (cpp backend, and the
Triton interpreter on tiny grids), torch.compile(fullgraph=True) through cross_entropy, linear_cross_entropy and
classification_head giving eager's losses and gradients, and, on CUDA, a captured CUDA graph and a sync-free step."""
import shutil

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from fastcls.ops import classification_head, cross_entropy, linear_cross_entropy

FORWARD = "fastcls::cross_entropy_forward"
LINEAR_FORWARD = "fastcls::linear_cross_entropy_forward"
LINEAR_BACKWARD = "fastcls::linear_cross_entropy_backward"
SCHEMAS = {
    FORWARD: "(Tensor logits, Tensor target, Tensor? weight, SymInt ignore_index, float label_smoothing, "
             "str reduction, str backend, bool with_grad) -> (Tensor, Tensor)",
    LINEAR_FORWARD: "(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, Tensor? weight, "
                    "SymInt ignore_index, float label_smoothing, str reduction, str backend, SymInt chunk_size, "
                    "ScalarType compute_dtype, bool grad_input, bool grad_weight, bool grad_bias) "
                    "-> (Tensor, Tensor, Tensor, Tensor)",
    LINEAR_BACKWARD: "(Tensor input, Tensor linear_weight, Tensor target, Tensor? linear_bias, Tensor? weight, "
                     "SymInt ignore_index, float label_smoothing, str backend, SymInt chunk_size, "
                     "ScalarType compute_dtype, Tensor grad_output, bool grad_input, bool grad_weight, bool grad_bias) "
                     "-> (Tensor, Tensor, Tensor)",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REDUCTIONS = ["mean", "sum", "none"]
# (rows, classes): odd sizes, and rows wider than one block of the kernel (C++ chunks of 2048 classes, Triton's
# single block of 32768), kept to two rows for the interpreter.
SHAPES = {"5x3": (5, 3), "7x2": (7, 2), "wide": {"cpp": (3, 2500), "triton": (2, 33000)}}


def op(name: str):
    namespace, op_name = name.split("::")
    return getattr(getattr(torch.ops, namespace), op_name).default


def kernel_backend(backend):
    name, device = backend
    if name == "reference":
        pytest.skip("the reference is plain torch ops, no custom op")
    return name, device


def shape_for(size: str, backend_name: str) -> tuple[int, int]:
    shape = SHAPES[size]
    return shape[backend_name] if isinstance(shape, dict) else shape


def random_case(shape, dtype, device, generator, *, weighted: bool):
    n_rows, n_classes = shape
    logits = (torch.randn(shape, generator=generator) * 3).to(dtype).to(device)
    target = torch.randint(0, n_classes, (n_rows,), generator=generator)
    if n_rows > 2:
        target[1] = -100
    weight = (torch.rand(n_classes, generator=generator) + 0.5).to(device) if weighted else None
    return logits, target.to(device), weight


@pytest.fixture
def fresh_compile():
    """A compile that does not reuse compiled graphs from an earlier run: AOT autograd's cache does not see a
    change to a custom op's Python backward, and a stale graph would make these tests pass or fail on old code."""
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


def test_the_ops_have_the_documented_schemas():
    for name, schema in SCHEMAS.items():
        assert str(op(name)._schema) == name + schema


# opcheck: schema (no undeclared mutation or aliasing), autograd registration, fake tensors, AOT dispatch with
# dynamic shapes (forward and backward against eager).


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted_smoothed"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("size", list(SHAPES))
def test_opcheck_cross_entropy_forward(backend, size, dtype, reduction, weighted, generator):
    name, device = kernel_backend(backend)
    logits, target, weight = random_case(shape_for(size, name), dtype, device, generator, weighted=weighted)
    smoothing = 0.1 if weighted else 0.0
    torch.library.opcheck(op(FORWARD), (logits.requires_grad_(), target, weight, -100, smoothing, reduction, name,
                                        True))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck_cross_entropy_forward_without_gradient(backend, reduction, generator):
    name, device = kernel_backend(backend)
    logits, target, weight = random_case((7, 2), torch.float32, device, generator, weighted=True)
    torch.library.opcheck(op(FORWARD), (logits, target, weight, -100, 0.0, reduction, name, False))


def linear_case(n_rows, dim, n_classes, dtype, device, generator, *, bias: bool):
    x = torch.randn(n_rows, dim, generator=generator).to(dtype)
    w = (torch.randn(n_classes, dim, generator=generator) * dim**-0.5 * 3).to(dtype)
    b = (torch.randn(n_classes, generator=generator) * 0.5).to(dtype) if bias else None
    target = torch.randint(0, n_classes, (n_rows,), generator=generator)
    target[0] = -100
    return x.to(device), w.to(device), None if b is None else b.to(device), target.to(device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize(("size", "bias"), [("5x3", True), ("7x2", False), ("wide", True)],
                         ids=["5x3-bias", "7x2-no_bias", "wide-bias"])
def test_opcheck_linear_cross_entropy_forward(backend, size, bias, dtype, reduction, generator):
    name, device = kernel_backend(backend)
    n_rows, n_classes = shape_for(size, name)
    x, w, b, target = linear_case(n_rows, 4, n_classes, dtype, device, generator, bias=bias)
    for leaf in (x, w, b):
        if leaf is not None:
            leaf.requires_grad_()
    in_forward = reduction != "none"  # "none" computes its gradients in the backward op
    class_weight = torch.rand(n_classes, generator=generator).to(device) + 0.5
    torch.library.opcheck(op(LINEAR_FORWARD), (
        x, w, target, b, class_weight, -100, 0.05, reduction, name, 2, dtype, in_forward, in_forward,
        in_forward and bias))


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)],
                         ids=["all", "input", "weight_and_bias"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_opcheck_linear_cross_entropy_backward(backend, dtype, needs, generator):
    name, device = kernel_backend(backend)
    x, w, b, target = linear_case(7, 5, 3, dtype, device, generator, bias=True)
    grad_output = torch.randn(7, generator=generator).to(device)
    torch.library.opcheck(op(LINEAR_BACKWARD), (x, w, target, b, None, -100, 0.1, name, 3, dtype, grad_output,
                                                *needs))


def test_opcheck_fails_on_a_fake_that_lies(generator):
    """opcheck has teeth: the forward's own implementation behind a fake that gets the gradient's dtype wrong."""
    from fastcls.ops.cross_entropy import _forward_fake, _forward_impl

    lying = torch.library.custom_op("fastcls_test::cross_entropy_forward_lying_fake", _forward_impl,
                                    mutates_args=())

    @lying.register_fake
    def _(*args):
        loss, grad = _forward_fake(*args)
        return loss, grad.double()

    logits, target, _ = random_case((5, 3), torch.float32, "cpu", generator, weighted=False)
    with pytest.raises(Exception, match="fake"):
        torch.library.opcheck(lying, (logits, target, None, -100, 0.0, "mean", "cpp", True))


# torch.compile(fullgraph=True): no graph break, the custom ops in the graph, eager's loss and gradients.


def compiled(fn, seen_ops: set | None = None, backend: str = "aot_eager"):
    """torch.compile(fn, fullgraph=True) on `backend`, recording into seen_ops the ops of Dynamo's graph."""
    inner = lookup_backend(backend)

    def recording(graph_module, example_inputs):
        if seen_ops is not None:
            seen_ops.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return inner(graph_module, example_inputs)

    return torch.compile(fn, fullgraph=True, backend=recording)


def assert_same(actual, expected, *, atol=1e-6, rtol=1e-5):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def eager_and_compiled(step, leaves, upstream, *, backend="aot_eager"):
    """(loss, leaf gradients) of step(*leaves).backward(upstream), eagerly and compiled; and the compiled graph's
    ops."""
    results, seen = [], set()
    for fn in (step, compiled(step, seen, backend)):
        copies = [leaf.detach().clone().requires_grad_() for leaf in leaves]
        loss = fn(*copies)
        loss.backward(upstream)
        results.append((loss.detach(), [copy.grad for copy in copies]))
    return results, seen


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted_smoothed"])
def test_compiled_cross_entropy_matches_eager(weighted, reduction, dtype, generator, fresh_compile):
    logits, target, weight = random_case((7, 5), dtype, "cpu", generator, weighted=weighted)
    # a non-unit upstream gradient, so that the traced backward's scaling is exercised
    upstream = torch.randn(7, generator=generator) if reduction == "none" else torch.tensor(1.7)

    def step(x):
        return cross_entropy(x * 1.5, target, weight=weight, label_smoothing=0.1 if weighted else 0.0,
                             reduction=reduction, backend="cpp")

    ((eager_loss, eager_grads), (loss, grads)), seen = eager_and_compiled(step, [logits], upstream)
    assert "fastcls.cross_entropy_forward.default" in seen
    assert_same(loss, eager_loss)
    assert_same(grads[0], eager_grads[0], atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_compiled_cross_entropy_on_the_triton_interpreter(backend, generator, fresh_compile):
    name, device = kernel_backend(backend)
    if name != "triton":
        pytest.skip("the Triton backend")
    logits, target, weight = random_case((5, 3), torch.float32, device, generator, weighted=True)

    def step(x):
        return cross_entropy(torch.tanh(x), target, weight=weight, label_smoothing=0.1, backend=name)

    ((eager_loss, eager_grads), (loss, grads)), seen = eager_and_compiled(step, [logits], torch.tensor(0.5))
    assert "fastcls.cross_entropy_forward.default" in seen
    assert_same(loss, eager_loss)
    assert_same(grads[0], eager_grads[0])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_compiled_linear_cross_entropy_matches_eager(bias, reduction, generator, fresh_compile):
    x, w, b, target = linear_case(9, 4, 6, torch.float32, "cpu", generator, bias=bias)
    class_weight = torch.rand(6, generator=generator) + 0.5
    upstream = torch.randn(9, generator=generator) if reduction == "none" else torch.tensor(0.6)

    def step(x, w, *b):
        return linear_cross_entropy(torch.tanh(x), w, target, linear_bias=b[0] if b else None, weight=class_weight,
                                    label_smoothing=0.1, reduction=reduction, backend="cpp", chunk_size=4)

    leaves = [x, w] + ([b] if bias else [])
    ((eager_loss, eager_grads), (loss, grads)), seen = eager_and_compiled(step, leaves, upstream)
    assert "fastcls.linear_cross_entropy_forward.default" in seen
    assert_same(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        assert_same(grad, eager_grad)


def test_compiled_linear_cross_entropy_under_autocast(generator, fresh_compile):
    x, w, b, target = linear_case(9, 4, 6, torch.float32, "cpu", generator, bias=True)

    def step(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(x, w, target, linear_bias=b, backend="cpp", chunk_size=4)

    ((eager_loss, eager_grads), (loss, grads)), _ = eager_and_compiled(step, [x, w, b], torch.tensor(1.0))
    assert_same(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        assert grad.dtype == torch.float32
        assert_same(grad, eager_grad)


def head_case(generator):
    hidden = torch.randn(4, 3, 8, generator=generator)
    weight = torch.randn(3, 8, generator=generator) * 8**-0.5
    bias = torch.randn(3, generator=generator) * 0.1
    target = torch.randint(0, 3, (4,), generator=generator)
    return [hidden, weight, bias], target


@pytest.mark.parametrize("dropout", ["p0", "eval", "p0.3"])
def test_compiled_classification_head_matches_eager(dropout, generator, fresh_compile):
    leaves, target = head_case(generator)
    p, training = {"p0": (0.0, True), "eval": (0.4, False), "p0.3": (0.3, True)}[dropout]

    def step(hidden, weight, bias):
        loss, _ = classification_head(hidden, weight, bias, target, dropout_p=p, training=training, seed=7,
                                      label_smoothing=0.05, backend="cpp")
        return loss

    ((eager_loss, eager_grads), (loss, grads)), seen = eager_and_compiled(step, leaves, torch.tensor(1.3))
    assert "fastcls.cross_entropy_forward.default" in seen
    assert_same(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        assert_same(grad, eager_grad)


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")), reason="inductor needs a C compiler")
def test_inductor_compiles_cross_entropy_and_its_backward(generator, fresh_compile):
    logits, target, weight = random_case((5, 3), torch.float32, "cpu", generator, weighted=True)

    def step(x):
        return cross_entropy(x * 2.0, target, weight=weight, reduction="none", backend="cpp")

    upstream = torch.randn(5, generator=generator)
    ((eager_loss, eager_grads), (loss, grads)), _ = eager_and_compiled(step, [logits], upstream, backend="inductor")
    assert_same(loss, eager_loss)
    assert_same(grads[0], eager_grads[0])


def test_inplace_gradient_runs_eagerly_inside_a_compiled_function(generator, fresh_compile):
    """inplace_grad is eager only: torch.compile breaks the graph around it and still gives eager's gradient."""
    logits, target, _ = random_case((6, 4), torch.float32, "cpu", generator, weighted=False)

    def step(x):
        return cross_entropy(x * 1.0, target, backend="cpp", inplace_grad=True) * 2

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        x = logits.clone().requires_grad_()
        fn(x).backward()
        results.append(x.grad)
    assert_same(results[1], results[0])


# CUDA: a captured graph replays the step, and the default path never waits for the device.


def cuda_step_inputs(generator):
    device = torch.device("cuda")
    logits = torch.randn(64, 10, generator=generator).to(device).requires_grad_()
    hidden = torch.randn(64, 16, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(10, 16, generator=generator) * 0.25).to(device).requires_grad_()
    target = torch.randint(0, 10, (64,), generator=generator).to(device)
    return logits, hidden, weight, target


def cuda_step(logits, hidden, weight, target, **options):
    loss = (cross_entropy(logits * 2, target, backend="triton", **options)
            + linear_cross_entropy(hidden, weight, target, backend="triton", **options))
    loss.backward()
    return loss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_captured_cuda_graph_replays_the_step_on_new_data(generator):
    logits, hidden, weight, target = cuda_step_inputs(generator)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles outside the capture
        for _ in range(2):
            for leaf in (logits, hidden, weight):
                leaf.grad = None
            cuda_step(logits, hidden, weight, target)
    torch.cuda.current_stream().wait_stream(side)
    for leaf in (logits, hidden, weight):
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # validate=True: the target check steps aside while capturing
        captured_loss = cuda_step(logits, hidden, weight, target)
    for _ in range(2):
        fresh = cuda_step_inputs(generator)
        with torch.no_grad():
            for static, new in zip((logits, hidden, weight, target), fresh):
                static.copy_(new)
        graph.replay()
        expected = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in fresh]
        expected_loss = cuda_step(*expected)
        torch.testing.assert_close(captured_loss, expected_loss.detach())
        for leaf, expected_leaf in zip((logits, hidden, weight), expected):
            torch.testing.assert_close(leaf.grad, expected_leaf.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("upstream", [1.0, 0.5], ids=["unit", "scaled"])
def test_a_training_step_never_waits_for_the_device(upstream, generator):
    inputs = cuda_step_inputs(generator)
    cuda_step(*inputs, validate=False)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in REDUCTIONS:
            loss = (cross_entropy(inputs[0], inputs[3], reduction=reduction, validate=False, backend="triton")
                    + linear_cross_entropy(inputs[1], inputs[2], inputs[3], reduction=reduction, validate=False,
                                           backend="triton"))
            (loss.sum() * upstream).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
