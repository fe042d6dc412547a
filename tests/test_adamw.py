"""FusedAdamW against torch.optim.AdamW(foreach=False) on every backend: groups, options, odd sizes, non-contiguous
parameters, the worked example, GradScaler skips and unscaling, state dicts both ways, schedulers, master
weights, the training loop's optimizer, and (CUDA) a step captured in a CUDA graph. FusedAdamW driven by
fastcls's device schedule (host-read-free steps on every backend, CUDA graphs of step and schedule) is tested in
test_schedule.py.

Over ~400 lines: the optimizer's contract with torch.optim.AdamW (state dicts both ways, every option, every
backend) is one subject; the schedule and capture tests live in test_schedule.py.
"""
import copy

import pytest
import torch
from torch import nn

from fastcls.components.optimizer import OptimizerConfig, build_optimizer, param_groups
from fastcls.optim import FusedAdamW
from fastcls.optim.adamw import MASTER_KEY


def interpreted(backend) -> bool:
    name, device = backend
    return name == "triton" and device.type == "cpu"


def make_params(specs, device, generator):
    """Fresh random parameters: a spec is a numel, "transposed" (dense, not contiguous), "strided" (a view with
    gaps, so not dense either) or "offset" (contiguous, starting 4 bytes into its storage: not 16-byte aligned)."""
    params = []
    for spec in specs:
        if spec == "transposed":
            value = torch.randn(37, 29, generator=generator).t()
        elif spec == "strided":
            value = torch.randn(23, 40, generator=generator)[:, ::3]
        elif spec == "offset":
            value = torch.randn(1 + 301, generator=generator)[1:]
        else:
            value = torch.randn(spec, generator=generator)
        params.append(value.to(device))
    return params


def twin(params):
    """Independent copies as leaf parameters with the same strides and storage offsets."""
    twins = []
    for p in params:
        span = 1 + sum((size - 1) * stride for size, stride in zip(p.shape, p.stride()))
        storage = torch.empty(p.storage_offset() + span, dtype=p.dtype, device=p.device)
        twins.append(nn.Parameter(storage.as_strided(p.shape, p.stride(), p.storage_offset()).copy_(p)))
    return twins


def set_grads(param_lists, generator):
    """The same fresh random gradient on the matching parameter of every list, laid out like the parameter where
    it is dense (as autograd lays it out), contiguous otherwise."""
    for group in zip(*param_lists):
        grad = torch.randn(group[0].shape, generator=generator).to(group[0].device)
        for p in group:
            p.grad = torch.empty_like(p).copy_(grad)


def assert_close_relative(actual, expected, rel=1e-6):
    """Element-wise within rel of the tensor's own scale (relative to its largest magnitude)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def assert_same_state(ours: FusedAdamW, reference: torch.optim.Optimizer, ours_params, reference_params, rel=1e-6):
    for p, q in zip(ours_params, reference_params, strict=True):
        assert_close_relative(p.detach(), q.detach(), rel)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key in reference.state[q]:
                assert_close_relative(ours.state[p][key], reference.state[q][key], rel)
        assert float(ours.state[p]["step"]) == float(reference.state[q]["step"])


CONFIGS = {
    "plain": {"options": {}, "sizes": [1, 7, 1_000_003]},
    "amsgrad": {"options": {"amsgrad": True}, "sizes": [1, 7, 4099]},
    "maximize": {"options": {"maximize": True}, "sizes": [1, 7, 4099]},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_torch_adamw(backend, generator, config):
    name, device = backend
    sizes, options = CONFIGS[config]["sizes"], CONFIGS[config]["options"]
    # an interpreted program of the 1M tensor costs tens of ms: fewer steps there
    steps = 10 if interpreted(backend) and max(sizes) > 100_000 else 100
    if name == "reference" and max(sizes) > 100_000:
        steps = 20  # the reference is torch's own ops in torch's order (bit for bit on the CPU); spare the CPU
    decayed = make_params(sizes, device, generator)
    plain = make_params(["transposed", "strided", "offset", 5], device, generator)
    ours_params = twin(decayed) + twin(plain)
    torch_params = twin(decayed) + twin(plain)
    assert not ours_params[len(decayed)].is_contiguous()

    def groups(params):
        return [{"params": params[:len(decayed)]},
                {"params": params[len(decayed):], "weight_decay": 0.0, "lr": 3e-3}]

    ours = FusedAdamW(groups(ours_params), lr=1e-3, weight_decay=0.05, backend=name, **options)
    reference = torch.optim.AdamW(groups(torch_params), lr=1e-3, weight_decay=0.05, foreach=False, **options)
    for _ in range(steps):
        set_grads([ours_params, torch_params], generator)
        ours.step()
        reference.step()
    # the GPU compiler contracts a*b+c into FMAs that torch's separate ops round twice: after 100 steps a few of a
    # million elements drift by ~3e-6 of the tensor's scale (H200, 2026-11-27)
    assert_same_state(ours, reference, ours_params, torch_params, rel=1e-5 if device.type == "cuda" else 1e-6)
    assert ours.state[ours_params[-1]]["step"].device == ours_params[-1].device


def test_each_tensor_keeps_its_own_step_count(backend, generator):
    """Parameters without a gradient skip a step, so one launch mixes tensors at different steps: each gets the
    bias corrections of its own count, as torch's per-parameter steps give."""
    name, device = backend
    start = make_params([7, 300, 4099], device, generator)
    ours_params, torch_params = twin(start), twin(start)
    ours = FusedAdamW(ours_params, lr=1e-2, backend=name)
    reference = torch.optim.AdamW(torch_params, lr=1e-2, foreach=False)
    for step in range(12):
        set_grads([ours_params, torch_params], generator)
        for i in range(len(start)):
            if step % (i + 2):  # tensor i gets a gradient every (i + 2)th step
                ours_params[i].grad = torch_params[i].grad = None
        ours.step()
        reference.step()
    assert [float(ours.state[p]["step"]) for p in ours_params] == [6.0, 4.0, 3.0]
    assert_same_state(ours, reference, ours_params, torch_params)


def adamw_float64(param, grads, lr, betas, eps, weight_decay):
    """An independent fp64 AdamW without bias correction (BERT's original optimizer)."""
    w, m, v = param.double(), torch.zeros_like(param, dtype=torch.float64), torch.zeros_like(param, dtype=torch.float64)
    for g in grads:
        g = g.double()
        w = w * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        w = w - lr * m / (v.sqrt() + eps)
    return w, m, v


def test_without_bias_correction(backend, generator):
    name, device = backend
    start = make_params([7, 4099], device, generator)
    params = twin(start)
    optimizer = FusedAdamW(params, lr=2e-3, betas=(0.8, 0.99), weight_decay=0.1, bias_correction=False, backend=name)
    history = [[], []]
    for _ in range(30):
        set_grads([params], generator)
        for i, p in enumerate(params):
            history[i].append(p.grad.clone())
        optimizer.step()
    for p, p0, grads in zip(params, start, history):
        w, m, v = adamw_float64(p0, grads, 2e-3, (0.8, 0.99), 1e-8, 0.1)
        assert_close_relative(p.detach().double(), w)
        assert_close_relative(optimizer.state[p]["exp_avg"].double(), m)
        assert_close_relative(optimizer.state[p]["exp_avg_sq"].double(), v)


def test_worked_example(backend):
    """The issue's first step: g = -0.05, lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay."""
    name, device = backend
    start = 1e-9 - 1e-3
    param = nn.Parameter(torch.full((3,), start, device=device))
    optimizer = FusedAdamW([param], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, backend=name)
    param.grad = torch.full((3,), -0.05, device=device)
    optimizer.step()
    state = optimizer.state[param]
    m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
    torch.testing.assert_close(m, torch.full_like(m, -0.005), rtol=1e-6, atol=0)
    torch.testing.assert_close(v, torch.full_like(v, 2.5e-6), rtol=1e-6, atol=0)
    torch.testing.assert_close(m / (1 - 0.9), torch.full_like(m, -0.05), rtol=1e-6, atol=0)
    torch.testing.assert_close(v / (1 - 0.999), torch.full_like(v, 0.0025), rtol=1e-6, atol=0)
    moved = param.detach().double() - torch.tensor(start, dtype=torch.float32).double()
    # lr * m_hat / (sqrt(v_hat) + eps) = 0.001 * 0.05 / 0.05000001: +0.001 up to eps
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-3 * 0.05 / (0.05 + 1e-8)), rtol=1e-6, atol=0)
    # the weight lands on 1e-9, within fp32's spacing near its start (1.2e-10) and eps's 2e-10
    assert abs(param.detach()[0].item() - 1e-9) < 4e-10
    assert float(state["step"]) == 1.0


def scaler_for(device):
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    scaler.scale(torch.ones((), device=device))  # creates the scale tensor, as scaling the loss would
    return scaler


def test_grad_scaler_scales_and_skips(backend, generator):
    name, device = backend
    start = make_params([7, 300], device, generator)
    ours_params, torch_params = twin(start), twin(start)
    ours = FusedAdamW(ours_params, lr=1e-2, backend=name)
    reference = torch.optim.AdamW(torch_params, lr=1e-2, foreach=False)
    ours_scaler, torch_scaler = scaler_for(device), scaler_for(device)
    for step in range(4):
        set_grads([ours_params, torch_params], generator)
        scale = ours_scaler.get_scale()
        for p, q in zip(ours_params, torch_params):
            p.grad.mul_(scale)
            q.grad.mul_(scale)
        if step == 1:  # clipping's order: unscale_ first, then step must not unscale again (pytorch#88258, #97415)
            ours_scaler.unscale_(ours)
            torch_scaler.unscale_(reference)
        ours_scaler.step(ours)
        torch_scaler.step(reference)
        ours_scaler.update()
        torch_scaler.update()
        for p, q in zip(ours_params, torch_params):
            assert_close_relative(p.grad, q.grad)  # left unscaled, as torch leaves them
    assert_same_state(ours, reference, ours_params, torch_params)

    before = copy.deepcopy(ours.state_dict())
    weights = [p.detach().clone() for p in ours_params]
    set_grads([ours_params], generator)
    ours_params[1].grad[5] = float("inf")
    ours_scaler.step(ours)
    ours_scaler.update()
    assert ours_scaler.get_scale() == scale / 2
    for p, w in zip(ours_params, weights):
        assert torch.equal(p.detach(), w)
    for index, saved in before["state"].items():
        for key, value in saved.items():
            assert torch.equal(ours.state_dict()["state"][index][key], value), key


@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_state_dict_round_trip(backend, generator, direction):
    name, device = backend
    start = make_params([7, 1000, "transposed"], device, generator)
    first_params, second_params, control_params = twin(start), twin(start), twin(start)

    def fused(params):
        return FusedAdamW(params, lr=1e-2, weight_decay=0.02, amsgrad=True, backend=name)

    def plain(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.02, amsgrad=True, foreach=False)

    make_first, make_second = (plain, fused) if direction == "torch_to_fused" else (fused, plain)
    first, control = make_first(first_params), plain(control_params)
    for _ in range(10):
        set_grads([first_params, control_params], generator)
        first.step()
        control.step()
    for p, q in zip(second_params, first_params):
        p.data.copy_(q.detach())
    second = make_second(second_params)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    for p in second_params:
        step = second.state[p]["step"]
        if isinstance(second, FusedAdamW):  # pytorch#103256: step beside its param, fp32
            assert step.device == p.device and step.dtype == torch.float32
    for _ in range(10):
        set_grads([second_params, control_params], generator)
        second.step()
        control.step()
    for p, q in zip(second_params, control_params):
        assert_close_relative(p.detach(), q.detach())
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_close_relative(second.state[p][key], control.state[q][key])
        assert float(second.state[p]["step"]) == 20.0


def test_lr_scheduler_and_tensor_lr(backend, generator):
    name, device = backend
    start = make_params([7, 513], device, generator)
    ours_params, torch_params = twin(start), twin(start)
    ours = FusedAdamW([{"params": ours_params[:1]}, {"params": ours_params[1:], "lr": torch.tensor(5e-3)}],
                      lr=1e-2, backend=name)
    reference = torch.optim.AdamW([{"params": torch_params[:1]}, {"params": torch_params[1:], "lr": 5e-3}],
                                  lr=1e-2, foreach=False)

    def warmup(step):
        return min(1.0, (step + 1) / 5) * 0.9**step

    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, warmup) for o in (ours, reference)]
    for _ in range(12):
        set_grads([ours_params, torch_params], generator)
        ours.step()
        reference.step()
        for scheduler in schedulers:
            scheduler.step()
    assert float(ours.param_groups[1]["lr"]) == pytest.approx(reference.param_groups[1]["lr"], rel=1e-6)
    assert_same_state(ours, reference, ours_params, torch_params)


def test_master_weights(backend, generator):
    """bf16 parameters with fp32 masters follow fp32 AdamW on the masters; the parameter is the rounded master."""
    name, device = backend
    start = make_params([7, 3001, "transposed"], device, generator)
    ours_params = [nn.Parameter(p.to(torch.bfloat16)) for p in start]
    torch_params = [nn.Parameter(p.to(torch.bfloat16).float()) for p in start]  # masters start at the bf16 values
    ours = FusedAdamW(ours_params, lr=1e-2, weight_decay=0.01, master_weights=True, backend=name)
    reference = torch.optim.AdamW(torch_params, lr=1e-2, weight_decay=0.01, foreach=False)
    for _ in range(20):
        set_grads([ours_params], generator)
        for p, q in zip(ours_params, torch_params):
            q.grad = torch.empty_like(q).copy_(p.grad)
        ours.step()
        reference.step()
    for p, q in zip(ours_params, torch_params):
        state = ours.state[p]
        assert state[MASTER_KEY].dtype == state["exp_avg"].dtype == torch.float32
        assert_close_relative(state[MASTER_KEY], q.detach())
        assert_close_relative(state["exp_avg_sq"], reference.state[q]["exp_avg_sq"])
        # the interpreter rounds to bf16 toward zero, the kernels to nearest even: one bf16 ulp apart at most
        rounded = state[MASTER_KEY].to(torch.bfloat16)
        if interpreted(backend):
            torch.testing.assert_close(p.detach(), rounded, rtol=2**-7, atol=0)
        else:
            assert torch.equal(p.detach(), rounded)

    # torch.optim.AdamW loads the state (ignoring the master); FusedAdamW reloads it with fp32 masters intact
    saved = copy.deepcopy(ours.state_dict())
    again = FusedAdamW([nn.Parameter(p.detach().clone()) for p in ours_params], lr=1e-2, master_weights=True,
                       backend=name)
    again.load_state_dict(copy.deepcopy(saved))
    for p, q in zip(again.param_groups[0]["params"], ours_params):
        assert torch.equal(again.state[p][MASTER_KEY], ours.state[q][MASTER_KEY])
        assert again.state[p]["exp_avg"].dtype == torch.float32
    plain = torch.optim.AdamW([nn.Parameter(p.detach().clone()) for p in ours_params], lr=1e-2)
    plain.load_state_dict(copy.deepcopy(saved))
    assert plain.state[plain.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.bfloat16


def test_master_follows_outside_changes(backend, generator):
    """A bf16 parameter overwritten in place (model.load_state_dict) is what the next step starts from."""
    name, device = backend
    param = nn.Parameter(make_params([33], device, generator)[0].to(torch.bfloat16))
    optimizer = FusedAdamW([param], lr=1e-3, weight_decay=0.0, master_weights=True, backend=name)
    set_grads([[param]], generator)
    optimizer.step()
    new = torch.randn(33, generator=generator).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():  # as model.load_state_dict writes it; writes through .data are not seen
        param.copy_(new)
    set_grads([[param]], generator)
    optimizer.step()
    # one step of at most lr (plus rounding) from the new values, not from the old master
    assert (param.detach().float() - new.float()).abs().max() < 1e-3 + 2**-7 * new.float().abs().max()


def test_empty_and_missing_grads(backend):
    name, device = backend
    empty, unused = nn.Parameter(torch.empty(0, device=device)), nn.Parameter(torch.ones(3, device=device))
    optimizer = FusedAdamW([empty, unused], backend=name)
    empty.grad = torch.empty(0, device=device)
    optimizer.step()
    optimizer.step()
    assert float(optimizer.state[empty]["step"]) == 2.0
    assert unused not in optimizer.state


def test_bad_arguments_are_named():
    param = [nn.Parameter(torch.ones(2))]
    for kwargs, word in [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": -1e-8}, "eps"),
                         ({"weight_decay": -0.1}, "weight_decay"), ({"backend": "cuda"}, "backend")]:
        with pytest.raises(ValueError, match=word):
            FusedAdamW(param, **kwargs)


def test_build_optimizer_is_fused_without_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optimizer = build_optimizer(param_groups(model, weight_decay=0.01), OptimizerConfig(lr=1e-3))
    assert isinstance(optimizer, FusedAdamW)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(plain["params"]) == 4


@pytest.mark.cuda
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_cuda_graph_capture(generator, max_grad_norm):
    """A step launches kernels only: it can be captured in a CUDA graph and replayed, fresh gradients each replay;
    a clipped step's norm and coefficient stay on the device, grad_norm included."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    device = torch.device("cuda")
    start = make_params([7, 100_003], device, generator)
    graphed_params, eager_params = twin(start), twin(start)
    graphed = FusedAdamW(graphed_params, lr=1e-2, max_grad_norm=max_grad_norm)
    eager = FusedAdamW(eager_params, lr=1e-2, max_grad_norm=max_grad_norm)
    set_grads([graphed_params, eager_params], generator)
    graphed.step()  # first step: state and address table
    eager.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graphed.step()
        eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for _ in range(3):
        for p, q in zip(graphed_params, eager_params):  # in place: the graph reads the gradients' addresses
            p.grad.normal_()
            q.grad.copy_(p.grad)
        graph.replay()
        eager.step()
        if max_grad_norm:
            torch.testing.assert_close(graphed.grad_norm, eager.grad_norm, rtol=0, atol=0)
    torch.cuda.synchronize()
    for p, q in zip(graphed_params, eager_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert float(graphed.state[graphed_params[0]]["step"]) == 5.0


@pytest.mark.cuda
def test_state_follows_parameters_moved_to_cuda(generator):
    """model.to("cuda") re-points param.data: the state moves along instead of being read from host memory."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    start = make_params([7, 5000], "cpu", generator)
    moved_params, torch_params = twin(start), twin(start)
    moved = FusedAdamW(moved_params, lr=1e-2)
    reference = torch.optim.AdamW(torch_params, lr=1e-2, foreach=False)
    for step in range(6):
        if step == 3:
            for p in moved_params:
                p.data = p.data.cuda()
        set_grads([moved_params, torch_params], generator)
        moved.step()
        reference.step()
    for p, q in zip(moved_params, torch_params):
        state = moved.state[p]
        assert state["exp_avg"].is_cuda and state["step"].is_cuda
        assert_close_relative(p.detach().cpu(), q.detach())
        assert_close_relative(state["exp_avg_sq"].cpu(), reference.state[q]["exp_avg_sq"])
