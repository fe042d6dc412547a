"""The multi-task cross-entropy and head on every backend against a per-task sum of torch's cross-entropy in
float64 (values and gradients for the logits, h, weight, bias and task_scale), with missing labels, a task
without labels, both h layouts, seeded dropout, autocast, torch.compile and bad input."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend

from fastcls.ops import (
    cpp,
    cross_entropy,
    dispatch,
    multi_task_cross_entropy,
    multi_task_cross_entropy_reference,
    multi_task_head,
)
from fastcls.ops.dropout import keep_mask, kept_scale

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the dtypes each backend's kernels are checked in here (fp64 always runs the reference); the Triton interpreter
# multiplies bf16 wrongly and is slow, so it gets fp32 only
CHECKED_DTYPES = {"reference": {"fp64", "fp32"}, "cpp": {"fp64", "fp32", "bf16", "fp16"}, "triton": {"fp32"}}
NUM_LABELS = {"2-5-3": [2, 5, 3], "7": [7]}


def skip_unchecked(backend, dtype_name):
    if dtype_name not in CHECKED_DTYPES[backend[0]]:
        pytest.skip(f"{dtype_name} is not checked on {backend[0]}")


def random_targets(n_rows, num_labels, generator, *, missing=0.3, unlabelled_task=None):
    targets = torch.stack([torch.randint(0, k, (n_rows,), generator=generator) for k in num_labels], dim=1)
    targets[torch.rand(targets.shape, generator=generator) < missing] = -100
    if unlabelled_task is not None:
        targets[:, unlabelled_task] = -100
    return targets


def random_case(n_rows, num_labels, dtype, device, generator, **target_options):
    logits = (torch.randn(n_rows, sum(num_labels), generator=generator) * 3).to(dtype)
    targets = random_targets(n_rows, num_labels, generator, **target_options)
    task_scale = torch.rand(len(num_labels), generator=generator, dtype=torch.float64) + 0.5
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return logits.to(device), targets.to(device), task_scale.to(scale_dtype).to(device)


def per_task_torch(logits, targets, num_labels, task_scale):
    """(loss, task sums) in float64: torch's summed cross-entropy per task, weighted."""
    sums = torch.stack([F.cross_entropy(segment, targets[:, task], reduction="sum", ignore_index=-100)
                        for task, segment in enumerate(logits.double().split(num_labels, dim=1))])
    return (sums * task_scale.double()).sum(), sums


def assert_close(actual, expected, tol):
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    error = (actual.detach().double().cpu() - expected.detach().double().cpu()).norm()
    scale = expected.detach().double().cpu().norm()
    assert error <= tol * max(scale, 1e-30), f"relative error {error / scale:.3g} exceeds {tol:g}"


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def float64_leaves(*tensors):
    return [t.detach().cpu().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("n_rows", [1, 13, 67])
@pytest.mark.parametrize("labels", list(NUM_LABELS))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_matches_torch_per_task_sum(backend, dtype_name, labels, n_rows, generator):
    skip_unchecked(backend, dtype_name)
    name, device = backend
    dtype, num_labels = DTYPES[dtype_name], NUM_LABELS[labels]
    logits, targets, task_scale = random_case(n_rows, num_labels, dtype, device, generator)
    x, scale = leaves(logits, task_scale)
    loss, sums = multi_task_cross_entropy(x, targets, num_labels, scale, backend=name)
    upstream = torch.rand((), generator=generator, dtype=torch.float64) + 0.5
    loss.backward(upstream.to(loss.dtype).to(device))
    x64, scale64 = float64_leaves(logits, task_scale)
    expected_loss, expected_sums = per_task_torch(x64, targets.cpu(), num_labels, scale64)
    (expected_loss * upstream).backward()
    tol = TOLERANCE[dtype]
    float_dtype = torch.promote_types(dtype, torch.float32)
    assert loss.dtype == sums.dtype == float_dtype and not sums.requires_grad
    assert x.grad.dtype == dtype and scale.grad.dtype == task_scale.dtype
    assert_close(loss, expected_loss, tol)
    assert_close(sums, expected_sums, tol)
    assert_close(x.grad, x64.grad, tol)
    assert_close(scale.grad, scale64.grad, tol)
    # the PyTorch reference gives the same on the same inputs
    reference_loss, reference_sums = multi_task_cross_entropy_reference(logits, targets, num_labels, task_scale)
    assert_close(loss, reference_loss, tol)
    assert_close(sums, reference_sums, tol)


# (rows, num_labels) per backend: enough logits for the C++ kernel to use every thread, with segments past one
# AVX-512 vector; for the Triton interpreter a segment wider than MAX_BLOCK, so its kernel loops over chunks (the
# row's largest logit in the last one, so that the running sum must be rescaled)
WIDE_CASES = {"reference": (40, [2, 37, 100]), "cpp": (2048, [2, 37, 100]), "triton": (3, [2, 37, 5000])}


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_many_rows_and_wide_tasks(backend, dtype_name, generator):
    skip_unchecked(backend, dtype_name)
    name, device = backend
    n_rows, num_labels = WIDE_CASES[name]
    logits, targets, task_scale = random_case(n_rows, num_labels, DTYPES[dtype_name], device, generator)
    logits[:, -1] += 20
    x, scale = leaves(logits, task_scale)
    loss, sums = multi_task_cross_entropy(x, targets, num_labels, scale, backend=name)
    loss.backward()
    x64, scale64 = float64_leaves(logits, task_scale)
    expected_loss, expected_sums = per_task_torch(x64, targets.cpu(), num_labels, scale64)
    expected_loss.backward()
    tol = TOLERANCE[logits.dtype]
    assert_close(loss, expected_loss, tol)
    assert_close(sums, expected_sums, tol)
    assert_close(x.grad, x64.grad, tol)
    assert_close(scale.grad, scale64.grad, tol)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_a_task_without_labels_adds_nothing(backend, dtype_name, generator):
    skip_unchecked(backend, dtype_name)
    name, device = backend
    num_labels = [2, 5, 3]
    logits, targets, task_scale = random_case(13, num_labels, DTYPES[dtype_name], device, generator,
                                              unlabelled_task=1)
    x, scale = leaves(logits, task_scale)
    loss, sums = multi_task_cross_entropy(x, targets, num_labels, scale, backend=name)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert sums[1] == 0 and scale.grad[1] == 0
    assert torch.all(x.grad[:, 2:7] == 0)
    assert x.grad[:, :2].abs().sum() > 0 and sums[0] > 0 and sums[2] > 0
    expected_loss, _ = per_task_torch(logits, targets.cpu(), num_labels, task_scale)
    assert_close(loss, expected_loss, TOLERANCE[logits.dtype])


def test_no_label_at_all(backend, generator):
    name, device = backend
    logits, targets, task_scale = random_case(5, [3, 4], torch.float32, device, generator, missing=1.0)
    x, scale = leaves(logits, task_scale)
    loss, sums = multi_task_cross_entropy(x, targets, [3, 4], scale, backend=name)
    loss.backward()
    assert loss == 0 and torch.all(sums == 0) and torch.all(x.grad == 0) and torch.all(scale.grad == 0)


def test_one_task_is_the_single_task_mean(backend, generator):
    """T = 1 with task_scale 1 / B is fastcls.ops.cross_entropy's mean: values and gradients."""
    name, device = backend
    logits, targets, _ = random_case(13, [7], torch.float32, device, generator, missing=0.0)
    x, single_x = leaves(logits, logits)
    loss, _ = multi_task_cross_entropy(x, targets, [7], torch.full((1,), 1 / 13, device=device), backend=name)
    loss.backward()
    mean = cross_entropy(single_x, targets[:, 0], backend=name)
    mean.backward()
    assert_close(loss, mean, 1e-6)
    assert_close(x.grad, single_x.grad, 1e-6)


def test_no_grad_forward_gives_the_same_loss(backend, generator):
    name, device = backend
    logits, targets, task_scale = random_case(13, [2, 5, 3], torch.float32, device, generator)
    loss, sums = multi_task_cross_entropy(logits.clone().requires_grad_(), targets, [2, 5, 3], task_scale,
                                          backend=name)
    with torch.no_grad():
        plain_loss, plain_sums = multi_task_cross_entropy(logits, targets, [2, 5, 3], task_scale, backend=name)
    assert torch.equal(loss.detach(), plain_loss) and torch.equal(sums, plain_sums)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("bad_target", [5, -1])
def test_out_of_range_target_names_row_and_task(backend, bad_target, requires_grad, generator):
    name, device = backend
    logits, targets, task_scale = random_case(6, [2, 5, 3], torch.float32, device, generator, missing=0.0)
    targets[4, 2] = bad_target
    with pytest.raises(IndexError, match=f"target {bad_target} in row 4 of task 2 is outside \\[0, 3\\)"):
        multi_task_cross_entropy(logits.requires_grad_(requires_grad), targets, [2, 5, 3], task_scale, backend=name)


def test_bad_arguments_name_themselves(generator):
    logits, targets, task_scale = random_case(4, [2, 3], torch.float32, "cpu", generator)
    with pytest.raises(ValueError, match="sum to 6, but the logits have 5"):
        multi_task_cross_entropy(logits, targets, [2, 4], task_scale)
    with pytest.raises(ValueError, match="num_labels must list"):
        multi_task_cross_entropy(logits, targets, [5, 0], task_scale)
    with pytest.raises(ValueError, match="targets must be"):
        multi_task_cross_entropy(logits, targets[:, :1], [2, 3], task_scale)
    with pytest.raises(ValueError, match="task_scale must be"):
        multi_task_cross_entropy(logits, targets, [2, 3], task_scale[:1])
    hidden, weight = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="h must be"):
        multi_task_head(hidden[None].expand(3, 4, 8), weight, None, targets, [2, 3], task_scale, dropout_p=0.0)
    with pytest.raises(ValueError, match="weight must be"):
        multi_task_head(hidden, weight[:4], None, targets, [2, 3], task_scale, dropout_p=0.0)


@pytest.mark.skipif(dispatch.cpp_ext is None, reason="C++ extension not built")
@pytest.mark.parametrize("segments", [[[0, 2], [2, 2]], [[0, 3], [2, 3]], [[0, 2], [2, 0]]],
                         ids=["short", "overlapping", "empty_task"])
def test_cpp_kernel_refuses_segments_that_do_not_tile_a_row(segments, generator):
    """The table the kernel walks is checked before it reads a logit: a wrong one raises, never reads past a row."""
    logits, targets, task_scale = random_case(4, [2, 3], torch.float32, "cpu", generator, missing=0.0)
    with pytest.raises(ValueError, match="multi_task_cross_entropy: (segment|the segments)"):
        cpp.multi_task_cross_entropy(logits, targets.clamp(max=1), torch.tensor(segments), task_scale, -100, None)


# The head: dropout, the product over the concatenated weights, the op.


def random_head(layout, n_rows, dim, num_labels, dtype, device, generator):
    shape = (n_rows, dim) if layout == "shared" else (len(num_labels), n_rows, dim)
    hidden = torch.randn(shape, generator=generator).to(dtype)
    weight = (torch.randn(sum(num_labels), dim, generator=generator) * dim**-0.5).to(dtype)
    bias = (torch.randn(sum(num_labels), generator=generator) * 0.1).to(dtype)
    return hidden.to(device), weight.to(device), bias.to(device)


def float64_head(hidden, weight, bias, targets, num_labels, task_scale, p, seed):
    """The head by hand in float64, task by task, with the mask every fastcls backend draws for this seed."""
    hidden, weight, task_scale = float64_leaves(hidden, weight, task_scale)
    bias = None if bias is None else float64_leaves(bias)[0]
    dropped = hidden
    if p > 0:
        dropped = torch.where(keep_mask(hidden.shape, p, seed, "cpu"), hidden * kept_scale(p), 0.0)
    weights = weight.split(num_labels)
    biases = [None] * len(num_labels) if bias is None else bias.split(num_labels)
    logits = torch.cat([F.linear(dropped if hidden.ndim == 2 else dropped[task], weights[task], biases[task])
                        for task in range(len(num_labels))], dim=1)
    loss, sums = per_task_torch(logits, targets.cpu(), num_labels, task_scale)
    return loss, sums, logits, [hidden, weight, bias, task_scale]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("layout", ["shared", "per_task"])
@pytest.mark.parametrize("dtype_name", ["fp64", "fp32", "bf16"])
def test_head_matches_float64(backend, dtype_name, layout, p, with_bias, generator):
    skip_unchecked(backend, dtype_name)
    name, device = backend
    dtype, num_labels = DTYPES[dtype_name], [2, 5, 3]
    hidden, weight, bias = random_head(layout, 13, 16, num_labels, dtype, device, generator)
    _, targets, task_scale = random_case(13, num_labels, dtype, device, generator)
    bias = bias if with_bias else None
    inputs = leaves(hidden, weight, task_scale) + (leaves(bias) if with_bias else [None])
    h, w, scale, b = inputs
    loss, sums, logits = multi_task_head(h, w, b, targets, num_labels, scale, dropout_p=p, seed=1234,
                                         backend=name)
    loss.backward()
    expected_loss, expected_sums, expected_logits, expected_leaves = float64_head(
        hidden, weight, bias, targets, num_labels, task_scale, p, 1234)
    expected_loss.backward()
    tol = TOLERANCE[dtype]
    assert logits.dtype == dtype
    assert_close(logits, expected_logits, tol)
    assert_close(loss, expected_loss, tol)
    assert_close(sums, expected_sums, tol)
    for leaf, expected in zip((h, w, b, scale), expected_leaves):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype
            assert_close(leaf.grad, expected.grad, tol)


def test_prediction_gives_logits_only(backend, generator):
    name, device = backend
    hidden, weight, bias = random_head("per_task", 5, 16, [2, 5], torch.float32, device, generator)
    loss, sums, logits = multi_task_head(hidden, weight, bias, None, [2, 5], None, dropout_p=0.5, training=False,
                                         backend=name)
    assert loss is None and sums is None
    _, _, expected_logits, _ = float64_head(hidden, weight, bias, torch.zeros(5, 2, dtype=torch.int64), [2, 5],
                                            torch.ones(2), 0.0, 0)
    assert_close(logits, expected_logits, 1e-5)


def test_default_task_scale_weights_every_task_one(generator):
    hidden, weight, bias = random_head("shared", 9, 16, [3, 2], torch.float32, "cpu", generator)
    targets = random_targets(9, [3, 2], generator)
    loss, sums, _ = multi_task_head(hidden, weight, bias, targets, [3, 2], None, dropout_p=0.0)
    torch.testing.assert_close(loss, sums.sum())


def test_autocast_runs_the_product_in_the_autocast_dtype(generator):
    hidden, weight, bias = random_head("per_task", 7, 16, [2, 5, 3], torch.float32, "cpu", generator)
    _, targets, task_scale = random_case(7, [2, 5, 3], torch.float32, "cpu", generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, sums, logits = multi_task_head(hidden, weight, bias, targets, [2, 5, 3], task_scale, dropout_p=0.0)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    expected_loss, expected_sums = per_task_torch(logits.float(), targets, [2, 5, 3], task_scale)
    assert_close(loss, expected_loss, 1e-5)
    assert_close(sums, expected_sums, 1e-5)


# The custom op: opcheck, and torch.compile(fullgraph=True) through the head with eager's loss and gradients.

OP = "fastcls::multi_task_cross_entropy_forward"


def test_opcheck(generator):
    logits, targets, task_scale = random_case(6, [2, 5, 3], torch.float32, "cpu", generator)
    op = torch.ops.fastcls.multi_task_cross_entropy_forward.default
    for with_grad in (True, False):
        torch.library.opcheck(op, (logits.requires_grad_(with_grad), targets, task_scale, [2, 5, 3], "cpp",
                                   with_grad))


@pytest.fixture
def fresh_compile():
    torch._dynamo.reset()
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(fx_graph_cache=False):
        yield
    torch._dynamo.reset()


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("cc", "gcc", "clang")),
                    reason="torch.compile needs a C compiler")
@pytest.mark.parametrize("layout", ["shared", "per_task"])
def test_compiled_head_matches_eager_without_graph_break(layout, generator, fresh_compile):
    num_labels = [2, 5, 3]
    hidden, weight, bias = random_head(layout, 6, 8, num_labels, torch.float32, "cpu", generator)
    _, targets, _ = random_case(6, num_labels, torch.float32, "cpu", generator)
    log_variance = torch.randn(3, generator=generator)

    def step(hidden, weight, bias, log_variance):
        # learned uncertainty weighting: the scales themselves need a gradient
        loss, _, _ = multi_task_head(hidden, weight, bias, targets, num_labels, torch.exp(-log_variance),
                                     dropout_p=0.2, seed=7, backend="cpp")
        return loss + log_variance.sum()

    seen = set()

    def recording(graph_module, example_inputs):
        seen.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return lookup_backend("aot_eager")(graph_module, example_inputs)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend=recording)):
        copies = leaves(hidden, weight, bias, log_variance)
        loss = fn(*copies)
        loss.backward(torch.tensor(1.3))
        results.append((loss.detach(), [copy.grad for copy in copies]))
    (eager_loss, eager_grads), (loss, grads) = results
    assert "fastcls.multi_task_cross_entropy_forward.default" in seen
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)
