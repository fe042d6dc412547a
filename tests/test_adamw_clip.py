"""FusedAdamW's `max_grad_norm` against torch.nn.utils.clip_grad_norm_ followed by torch.optim.AdamW
(foreach=False, fp32 masters for the bf16 parameters) on every backend: fp32 buckets and a bf16 bucket with fp32
master weights clipped by one norm, norms below and above the limit, GradScaler's scale and skips, a
non-finite norm, the norm it reports, and gradients left as they were."""
import pytest
import torch
from torch import nn
from test_adamw import assert_close_relative, interpreted, make_params, scaler_for, twin

from fastcls.optim import FusedAdamW
from fastcls.optim.adamw import MASTER_KEY

FP32_SIZES = [1, 7, 100_003, "transposed", "offset"]
BF16_SIZES = [33, 3001]


def setup(backend, generator, max_norm, **options):
    """Ours: an fp32 group with decay, an fp32 group without, a bf16 master-weights group; torch's: fp32 twins
    of all of them (the bf16 ones starting at their bf16 values, as the masters do)."""
    name, device = backend
    fp32 = make_params(FP32_SIZES, device, generator)
    bf16 = [p.to(torch.bfloat16) for p in make_params(BF16_SIZES, device, generator)]
    ours_params = twin(fp32) + [nn.Parameter(p.clone()) for p in bf16]
    torch_params = twin(fp32) + [nn.Parameter(p.float()) for p in bf16]

    def groups(params):
        return [{"params": params[:3]}, {"params": params[3:5], "weight_decay": 0.0, "lr": 3e-3},
                {"params": params[5:]}]

    ours = FusedAdamW(groups(ours_params), lr=1e-2, weight_decay=0.05, master_weights=True, max_grad_norm=max_norm,
                      backend=name, **options)
    reference = torch.optim.AdamW(groups(torch_params), lr=1e-2, weight_decay=0.05, foreach=False, **options)
    return ours, reference, ours_params, torch_params


def set_grads(ours_params, torch_params, generator, scale=1.0):
    """A fresh random gradient of norm ~ 0.5 * sqrt(numel) (times `scale`) on each pair, in each parameter's
    dtype (bf16 gradients, widened exactly, on torch's twins); returns copies of ours."""
    for p, q in zip(ours_params, torch_params):
        grad = (torch.randn(p.shape, generator=generator) * 0.5 * scale).to(device=p.device, dtype=p.dtype)
        p.grad = torch.empty_like(p).copy_(grad)
        q.grad = torch.empty_like(q).copy_(grad)
    return [p.grad.clone() for p in ours_params]


def assert_same_state(ours, reference, ours_params, torch_params):
    for p, q in zip(ours_params, torch_params):
        state = ours.state[p]
        weight = state[MASTER_KEY] if p.dtype == torch.bfloat16 else p.detach()
        assert_close_relative(weight, q.detach())
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_relative(state[key], reference.state[q][key])
        assert float(state["step"]) == float(reference.state[q]["step"])


def exact_norm(grads) -> float:
    return float(torch.linalg.vector_norm(torch.cat([g.double().flatten().cpu() for g in grads])))


@pytest.mark.parametrize("clipped", [True, False], ids=["above-max", "below-max"])
def test_clip_matches_clip_grad_norm_then_adamw(backend, generator, clipped):
    name, _ = backend
    max_norm = 20.0 if clipped else 1e6  # the gradients' norm is ~160
    ours, reference, ours_params, torch_params = setup(backend, generator, max_norm, amsgrad=not clipped)
    for _ in range(4 if interpreted(backend) else 8):
        grads = set_grads(ours_params, torch_params, generator)
        ours.step()
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_params, max_norm, foreach=False)
        reference.step()
        assert (float(torch_norm) > max_norm) == clipped
        torch.testing.assert_close(ours.grad_norm, torch_norm, rtol=1e-6, atol=0)
        # the C++ kernels sum in fp64: the norm is the exact one rounded to fp32
        rel = 2**-23 if name == "cpp" else 1e-6
        assert float(ours.grad_norm) == pytest.approx(exact_norm(grads), rel=rel)
        for p, g in zip(ours_params, grads, strict=True):
            assert torch.equal(p.grad, g)  # clipped in registers only
    assert ours.grad_norm.dtype == torch.float32 and ours.grad_norm.device == ours_params[0].device
    assert_same_state(ours, reference, ours_params, torch_params)


def test_clip_with_grad_scaler(backend, generator):
    """Scaled gradients: the norm is the unscaled gradients' (torch: unscale_, then clip); the gradients are left
    unscaled, not clipped; a step with an inf is skipped whole."""
    _, device = backend
    ours, reference, ours_params, torch_params = setup(backend, generator, 20.0)
    ours_scaler, torch_scaler = scaler_for(device), scaler_for(device)
    for _ in range(3):
        scale = ours_scaler.get_scale()
        grads = set_grads(ours_params, torch_params, generator, scale=scale)
        ours_scaler.step(ours)  # no unscale_: the step unscales, measures and clips
        torch_scaler.unscale_(reference)
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_params, 20.0, foreach=False)
        torch_scaler.step(reference)
        ours_scaler.update()
        torch_scaler.update()
        torch.testing.assert_close(ours.grad_norm, torch_norm, rtol=1e-6, atol=0)
        for p, g in zip(ours_params, grads):
            torch.testing.assert_close(p.grad, (g.float() / scale).to(g.dtype), rtol=0, atol=0)
    assert_same_state(ours, reference, ours_params, torch_params)

    weights = [p.detach().clone() for p in ours_params]
    steps = [float(ours.state[p]["step"]) for p in ours_params]
    set_grads(ours_params, torch_params, generator, scale=ours_scaler.get_scale())
    ours_params[2].grad[5] = float("inf")
    ours_scaler.step(ours)
    ours_scaler.update()
    assert ours.grad_norm.isinf()
    for p, w, step in zip(ours_params, weights, steps):
        assert torch.equal(p.detach(), w) and float(ours.state[p]["step"]) == step


def test_nonfinite_norm_as_clip_grad_norm(backend, generator):
    """Without a scaler an infinite gradient gives an infinite norm and coefficient 0, as clip_grad_norm_ without
    error_if_nonfinite: inf x 0 is NaN where the inf was, the finite gradients count as 0."""
    ours, reference, ours_params, torch_params = setup(backend, generator, 20.0)
    set_grads(ours_params, torch_params, generator)
    for params in (ours_params, torch_params):
        params[0].grad[0] = float("inf")
    ours.step()
    assert ours.grad_norm.isinf()
    torch.nn.utils.clip_grad_norm_(torch_params, 20.0, foreach=False)
    reference.step()
    for p, q in zip(ours_params[:5], torch_params[:5]):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, equal_nan=True)
    assert ours_params[0].isnan().all()


def test_no_clipping_by_default_and_bad_max_norm():
    param = nn.Parameter(torch.ones(3))
    optimizer = FusedAdamW([param])
    param.grad = torch.full((3,), 100.0)
    optimizer.step()
    assert optimizer.max_grad_norm == 0.0 and optimizer.grad_norm is None
    assert "max_grad_norm" not in optimizer.state_dict()["param_groups"][0]  # torch's AdamW loads it as ever
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_grad_norm"):
            FusedAdamW([param], max_grad_norm=bad)
