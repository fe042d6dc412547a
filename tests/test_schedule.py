"""The schedule's multiplier, its LambdaLR driver, and DeviceLRSchedule: the same rates from device tensors,
with no host read and the same ops every step; FusedAdamW driven by it as LambdaLR drives torch.optim.AdamW, its
steps reading no tensor on the host on every backend, and (CUDA) step and schedule captured in a CUDA graph."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
from test_adamw import assert_same_state, make_params, set_grads, twin  # pytest puts tests/ on sys.path
from torch.utils._python_dispatch import TorchDispatchMode

from fastcls.components.lr_schedule import (
    DECAYS,
    DeviceLRSchedule,
    ScheduleConfig,
    build_scheduler,
    lr_factor,
    resolve_warmup_steps,
)
from fastcls.optim import FusedAdamW


def test_linear_decay_worked_example():
    # linear decay from 0.001 to 0 over 1000 steps gives 0.0005 at step 500
    cfg = ScheduleConfig(total_steps=1000, warmup_steps=0, decay="linear")
    assert 0.001 * lr_factor(500, cfg) == pytest.approx(0.0005, rel=1e-12)
    assert lr_factor(0, cfg) == 1.0
    assert lr_factor(1000, cfg) == 0.0


def test_linear_warmup_worked_example():
    # linear warmup from 0.00001 to 0.001 over 100 steps gives 0.000505 at step 50
    cfg = ScheduleConfig(total_steps=1000, warmup_steps=100, decay="linear", warmup_start_factor=0.00001 / 0.001)
    assert 0.001 * lr_factor(50, cfg) == pytest.approx(0.000505, rel=1e-12)
    assert 0.001 * lr_factor(0, cfg) == pytest.approx(0.00001, rel=1e-12)
    assert lr_factor(100, cfg) == pytest.approx(1.0)


def test_cosine_and_constant():
    cos = ScheduleConfig(total_steps=110, warmup_steps=10, decay="cosine")
    assert lr_factor(10, cos) == pytest.approx(1.0)
    assert lr_factor(60, cos) == pytest.approx(0.5)
    assert lr_factor(110, cos) == pytest.approx(0.0, abs=1e-12)
    const = ScheduleConfig(total_steps=100, warmup_steps=10, decay="constant")
    assert lr_factor(5, const) == pytest.approx(0.5)
    assert all(lr_factor(s, const) == 1.0 for s in range(10, 100))


def test_warmup_ratio_or_steps():
    assert resolve_warmup_steps(0.06, 125) == 8
    assert resolve_warmup_steps(30, 125) == 30
    assert resolve_warmup_steps(500, 125) == 125
    with pytest.raises(ValueError, match="--warmup"):
        resolve_warmup_steps(-1, 10)


def test_scheduler_drives_optimizer_lr():
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([w], lr=0.001)
    sched = build_scheduler(opt, ScheduleConfig(total_steps=20, warmup_steps=4, decay="linear"))
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == 0.0
    assert seen[2] == pytest.approx(0.0005)
    assert seen[4] == pytest.approx(0.001)
    assert seen[12] == pytest.approx(0.001 * (1 - 8 / 16))
    assert all(b <= a for a, b in zip(seen[4:], seen[5:], strict=False))
    assert math.isclose(seen[-1], 0.001 / 16)


# (total_steps, warmup_steps): no warmup, some, warmup to the end, and a one-step run
LENGTHS = [(30, 0), (30, 8), (30, 30), (1, 1)]


def holder(base_lrs):
    """An optimizer whose groups only hold rates (SGD is never stepped here)."""
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in base_lrs])


def assert_rates(optimizer, schedule, step, cfg, base_lrs):
    for group, lr, base in zip(optimizer.param_groups, schedule.lrs, base_lrs, strict=True):
        assert group["lr"] is lr and lr.dtype == torch.float32 and lr.ndim == 0
        # computed in fp64, stored in fp32: the fp32 rounding of lr_factor's rate
        assert lr.item() == pytest.approx(base * lr_factor(step, cfg), rel=2**-23, abs=1e-30), (step, cfg)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("warmup_start_factor", [0.0, 0.25])
@pytest.mark.parametrize("final_factor", [0.0, 0.1])
@pytest.mark.parametrize("lengths", LENGTHS, ids=[f"total{t}-warmup{w}" for t, w in LENGTHS])
def test_device_schedule_follows_lr_factor(decay, warmup_start_factor, final_factor, lengths):
    cfg = ScheduleConfig(*lengths, decay=decay, warmup_start_factor=warmup_start_factor, final_factor=final_factor)
    base_lrs = [1e-3, 3e-5]
    optimizer = holder(base_lrs)
    schedule = DeviceLRSchedule(optimizer, cfg)
    assert_rates(optimizer, schedule, 0, cfg, base_lrs)  # the first update's rate, before any step()
    for step in range(1, 51):  # well past total_steps: the rate stays at its last value
        schedule.step()
        assert_rates(optimizer, schedule, step, cfg, base_lrs)
    assert schedule.get_last_lr() == pytest.approx(schedule.lrs_after(50), rel=2**-23)


class OpRecorder(TorchDispatchMode):
    """The aten ops run under it, with their tensors' shapes and dtypes (not values); fails on a host read."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:  # what .item(), float(), bool() dispatch to
            raise AssertionError("a tensor value was read on the host")
        kwargs = kwargs or {}
        self.ops.append((str(func), signature((args, kwargs))))
        return func(*args, **kwargs)


def signature(value):
    """What of an op's argument fixes the kernel it runs: a tensor's shape and dtype, a number's value."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype, value.device
    if isinstance(value, (list, tuple)):
        return tuple(signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, signature(v)) for k, v in value.items())
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    return type(value).__name__  # e.g. the profiler's record-function handle of Optimizer.step


@pytest.mark.parametrize("decay", DECAYS)
def test_device_schedule_runs_the_same_ops_every_step(decay):
    """Warmup, decay and past the end: one op sequence, so a CUDA graph captured at any step replays them all."""
    optimizer = holder([1e-3, 2e-3])
    schedule = DeviceLRSchedule(optimizer, ScheduleConfig(6, 3, decay=decay, warmup_start_factor=0.1))
    sequences = []
    for _ in range(9):
        with OpRecorder() as recorder:
            schedule.step()
        sequences.append(recorder.ops)
    assert sequences[0] and all(ops == sequences[0] for ops in sequences)


def test_device_schedule_state_dict_resumes():
    cfg = ScheduleConfig(20, 4, decay="cosine", warmup_start_factor=0.1, final_factor=0.05)
    first = FusedAdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-3)
    first_schedule = DeviceLRSchedule(first, cfg)
    for _ in range(7):
        first_schedule.step()
    saved, saved_optimizer = first_schedule.state_dict(), copy.deepcopy(first.state_dict())
    assert saved == {"last_epoch": 7, "base_lrs": [1e-3]}

    second = FusedAdamW([torch.nn.Parameter(torch.ones(3))], lr=5.0)  # the base rate comes from the state
    second_schedule = DeviceLRSchedule(second, cfg)
    second.load_state_dict(saved_optimizer)
    with pytest.raises(RuntimeError, match="load_state_dict"):  # the loaded group lr is not the schedule's
        second_schedule.step()
    second_schedule.load_state_dict(saved)
    assert second.param_groups[0]["lr"] is second_schedule.lrs[0]
    for step in range(7, 25):
        assert second_schedule.get_last_lr() == first_schedule.get_last_lr()
        assert second_schedule.get_last_lr() == pytest.approx(second_schedule.lrs_after(step), rel=2**-23)
        first_schedule.step()
        second_schedule.step()


def test_device_schedule_rejects_an_unknown_decay():
    with pytest.raises(ValueError, match="--decay"):
        DeviceLRSchedule(holder([1e-3]), ScheduleConfig(10, decay="step"))


# FusedAdamW driven by DeviceLRSchedule

CFG = ScheduleConfig(total_steps=16, warmup_steps=4, decay="cosine", warmup_start_factor=0.1, final_factor=0.05)


def fused_with_schedule(params, backend_name, extra_groups=()):
    """FusedAdamW over two groups (decayed, and undecayed at another rate) and `extra_groups`, with a device
    schedule."""
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "lr": 3e-3}, *extra_groups]
    optimizer = FusedAdamW(groups, lr=1e-2, weight_decay=0.05, backend=backend_name)
    return optimizer, DeviceLRSchedule(optimizer, CFG)


def test_fused_adamw_with_device_schedule_matches_torch_with_lambda_lr(backend, generator):
    """The rates of torch's LambdaLR (Python floats) and the device schedule's (fp32 tensors) drive the same
    updates, bias correction and weight decay included, to within fp32 rounding."""
    name, device = backend
    start = make_params([7, 4099, "transposed", 5], device, generator)
    ours_params, torch_params = twin(start), twin(start)
    ours, schedule = fused_with_schedule(ours_params, name)
    reference = torch.optim.AdamW([{"params": torch_params[:2]}, {"params": torch_params[2:], "weight_decay": 0.0,
                                                                  "lr": 3e-3}], lr=1e-2, weight_decay=0.05,
                                  foreach=False)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(reference, lambda step: lr_factor(step, CFG))
    for _ in range(20):  # past total_steps
        for group, reference_group in zip(ours.param_groups, reference.param_groups, strict=True):
            assert group["lr"].item() == pytest.approx(reference_group["lr"], rel=2**-23, abs=1e-30)
        set_grads([ours_params, torch_params], generator)
        ours.step()
        schedule.step()
        reference.step()
        lambda_lr.step()
    assert_same_state(ours, reference, ours_params, torch_params, rel=1e-5 if device.type == "cuda" else 1e-6)


HOST_READS = ("item", "__float__", "__bool__", "__int__")


def test_step_and_schedule_read_no_tensor_on_the_host(backend, generator, monkeypatch):
    """After the first step (which builds the state and the address tables), a step of fp32 and bf16
    master-weight groups with a tensor lr, a grad scale and found_inf, then the schedule's step, never read a
    tensor's value on the host, and each step runs the same ops with the same kernel arguments."""
    name, device = backend
    params = twin(make_params([7, 4099, "transposed", "offset"], device, generator))
    masters = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in make_params([33], device, generator)]
    optimizer, schedule = fused_with_schedule(params, name, [{"params": masters, "master_weights": True}])
    optimizer.grad_scale = torch.tensor(4.0, device=device)  # as GradScaler.step hands them over
    optimizer.found_inf = torch.zeros((), device=device)
    set_grads([params + masters], generator)
    optimizer.step()
    schedule.step()

    launches = record_kernel_calls(monkeypatch, name)
    for method in HOST_READS:
        monkeypatch.setattr(torch.Tensor, method, forbidden(method))
    sequences, before = [], [p.detach().clone() for p in params]
    for _ in range(3):
        refill_grads([params + masters], generator)
        with OpRecorder() as recorder:
            optimizer.step()
            schedule.step()
        sequences.append(recorder.ops)
    monkeypatch.undo()
    assert all(ops == sequences[0] for ops in sequences)
    if launches is not None:
        per_step = len(optimizer.param_groups)  # a bucket a group
        assert len(launches) == 3 * per_step
        assert launches[:per_step] == launches[per_step:2 * per_step] == launches[2 * per_step:]
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert float(optimizer.state[params[0]]["step"]) == 4.0


def forbidden(method):
    def read(*args, **kwargs):
        raise AssertionError(f"Tensor.{method} read a tensor on the host during a step")
    return read


def record_kernel_calls(monkeypatch, backend_name) -> list | None:
    """Patch the backend's AdamW kernels to log each call's arguments (tensors by address, dtype and shape)."""
    from fastcls.ops import cpp, dispatch

    calls = []
    if backend_name == "cpp":
        extension = dispatch.cpp_ext

        def logged(entry_point):
            def call(*args):
                calls.append((entry_point, args))  # addresses and numbers only
                return getattr(extension, entry_point)(*args)
            return call
        monkeypatch.setattr(dispatch, "cpp_ext", SimpleNamespace(
            **{entry_point: logged(entry_point) for entry_point in cpp.ADAMW_KERNELS.values()}))
        return calls
    if backend_name == "triton":
        import fastcls.kernels.adamw as kernels

        kernel = kernels._adamw_kernel

        def describe(value):
            return (value.data_ptr(), value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else value

        class LoggedKernel:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls.append((grid, [describe(a) for a in args], sorted(kwargs.items())))
                    return kernel[grid](*args, **kwargs)
                return launch
        monkeypatch.setattr(kernels, "_adamw_kernel", LoggedKernel())
        return calls
    return None  # the reference launches torch ops, which OpRecorder compares


def graphable(device, generator, master: bool):
    """Twin optimizers (FusedAdamW with a DeviceLRSchedule) over twin parameters with static gradients; fp32, or
    bf16 with master weights."""
    start = make_params([7, 100_003, "transposed", "offset"], device, generator)
    dtype = torch.bfloat16 if master else torch.float32
    runs = []
    for _ in range(2):
        params = [torch.nn.Parameter(p.detach().to(dtype)) for p in twin(start)]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer = FusedAdamW(params, lr=1e-2, weight_decay=0.01, master_weights=master)
        cfg = ScheduleConfig(total_steps=8, warmup_steps=3, decay="cosine", warmup_start_factor=0.1, final_factor=0.1)
        runs.append((params, optimizer, DeviceLRSchedule(optimizer, cfg)))
    return runs


def refill_grads(param_lists, generator):
    """The same fresh gradient, copied into each list's static .grad tensors."""
    for group in zip(*param_lists):
        grad = torch.randn(group[0].shape, generator=generator).to(group[0].device)
        for p in group:
            p.grad.copy_(grad)


@pytest.mark.cuda
@pytest.mark.parametrize("master", [False, True], ids=["fp32", "bf16-master"])
def test_cuda_graph_replays_step_and_device_schedule(generator, master):
    """`optimizer.step(); schedule.step()` captured once and replayed with fresh gradients equals eager steps:
    the weights, the step counts and the rate, which goes on following the schedule (warmup, decay, past the
    end) rather than the value it had at capture."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    (graphed_params, graphed, graphed_schedule), (eager_params, eager, eager_schedule) = graphable(
        torch.device("cuda"), generator, master)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # state, address tables and compilation, none of which a capture may do
        for _ in range(2):
            refill_grads([graphed_params, eager_params], generator)
            for optimizer, schedule in ((graphed, graphed_schedule), (eager, eager_schedule)):
                optimizer.step()
                schedule.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
        graphed_schedule.step()
    for _ in range(10):
        refill_grads([graphed_params, eager_params], generator)
        graph.replay()
        eager.step()
        eager_schedule.step()
    torch.cuda.synchronize()
    for p, q in zip(graphed_params, eager_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
        torch.testing.assert_close(graphed.state[p]["exp_avg_sq"], eager.state[q]["exp_avg_sq"], rtol=0, atol=0)
    assert float(graphed.state[graphed_params[0]]["step"]) == 12.0
    assert graphed_schedule.get_last_lr() == eager_schedule.get_last_lr()
    assert graphed_schedule.get_last_lr() == pytest.approx(graphed_schedule.lrs_after(12), rel=2**-23)


@pytest.mark.cuda
def test_cuda_step_and_device_schedule_never_wait_for_the_device(generator):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    (params, optimizer, schedule), _ = graphable(torch.device("cuda"), generator, master=False)
    refill_grads([params], generator)
    optimizer.step()  # builds the state and the address table
    schedule.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            optimizer.step()
            schedule.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
