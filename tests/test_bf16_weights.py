"""bf16 weights with fp32 masters (fastcls.components.bf16_weights): the CPU bf16 step trains as autocast over fp32
weights does, and everything outside the step sees fp32."""
import copy

import pytest
import torch
from safetensors.torch import load_file

import fastcls
from fastcls.components import bf16_weights
from fastcls.components.bf16_weights import Bf16Weights
from fastcls.components.optimizer import param_groups
from fastcls.data import collate
from fastcls.models.classifier import EncoderClassifier
from fastcls.ops import dispatch
from fastcls.optim import FusedAdamW
from fastcls.optim.adamw import MASTER_KEY
from tests.tiny import encoded_rows, tiny_encoder, tiny_run_inputs


def classifier(seed=0):
    model = EncoderClassifier(tiny_encoder("bert", dropout=0.0), 3, 0.0, packed=True)
    torch.manual_seed(seed)
    with torch.no_grad():  # fresh random biases and norms, not the zeros and ones of a new model
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.train()


def train_steps(model, optimizer, batches):
    losses = []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture
def batches():
    data = encoded_rows([5, 17, 9, 30, 3, 12, 21, 8], seed=4)
    return [collate(data, rows, packed=True) for rows in ([0, 1, 2, 3], [4, 5, 6, 7], [1, 3, 5, 7])]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_bf16_weights_train_exactly_as_autocast_over_fp32_weights(batches, backend):
    if backend == "cpp" and dispatch.cpp_ext is None:
        pytest.skip(f"no C++ kernels: {dispatch.CPP_ERROR}")
    reference = classifier()
    model = copy.deepcopy(reference)
    expected_optimizer = FusedAdamW(param_groups(reference, 0.01), lr=3e-3, backend=backend)
    optimizer = FusedAdamW(param_groups(model, 0.01), lr=3e-3, master_weights=True, backend=backend)
    weights = Bf16Weights(model, optimizer)
    cast = [name for name, p in model.named_parameters() if p.dtype == torch.bfloat16]
    assert cast and all(name.startswith("encoder.") for name in cast)
    assert any(".attention.self.query.weight" in name for name in cast) and any(".bias" in name for name in cast)
    assert train_steps(model, optimizer, batches) == train_steps(reference, expected_optimizer, batches)
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name in state:
        assert state[name].dtype == expected[name].dtype, name
        assert torch.equal(state[name], expected[name]), name
    weights.restore()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is None
        assert torch.equal(p, expected[name]), name


def test_the_masters_start_from_the_exact_fp32_weights_and_the_state_dict_shows_them():
    model = classifier()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = FusedAdamW(param_groups(model, 0.01), lr=1e-3, master_weights=True)
    weights = Bf16Weights(model, optimizer)
    for name, p in model.named_parameters():
        if p.dtype == torch.bfloat16:
            assert torch.equal(p, original[name].to(torch.bfloat16))
            assert torch.equal(optimizer.state[p][MASTER_KEY], original[name])
            assert not torch.equal(original[name].to(torch.bfloat16).float(), original[name]), "nothing was rounded"
    assert all(torch.equal(t, original[name]) for name, t in model.state_dict().items() if name in original)
    weights.restore()
    assert all(torch.equal(p, original[name]) for name, p in model.named_parameters())


def test_frozen_layers_and_the_head_stay_fp32():
    model = classifier()
    model.freeze(embeddings=True, layers=1)
    Bf16Weights(model, FusedAdamW(param_groups(model, 0.01), lr=1e-3, master_weights=True))
    for name, p in model.named_parameters():
        low = p.dtype == torch.bfloat16
        assert low == (p.requires_grad and name.startswith("encoder.encoder.layer.") and p.ndim <= 2
                       and "LayerNorm" not in name), name


def test_a_cpu_bf16_run_matches_autocast_saves_fp32_and_returns_an_fp32_model(tmp_path, monkeypatch, caplog):
    tiny_run_inputs(tmp_path, 48, seed=1)
    settings = dict(model=str(tmp_path / "encoder"), train=str(tmp_path / "train.tsv"), dev=None, batch_size=8,
                    lr=2e-3, seed=5, precision="bf16", device="cpu", max_grad_norm=0.5, epochs=1)
    with caplog.at_level("INFO", logger="fastcls"):
        result = fastcls.train(output=str(tmp_path / "bf16"), **settings)
    assert "bf16 weights, fp32 masters" in caplog.text
    monkeypatch.setattr(bf16_weights, "applies", lambda *args: False)  # autocast over fp32 weights
    expected = fastcls.train(output=str(tmp_path / "autocast"), **settings)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    saved, saved_expected = (load_file(run / "model.safetensors") for run in (result.output, expected.output))
    assert saved.keys() == saved_expected.keys()
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, saved_expected[name]), name


def test_bf16_weights_apply_to_single_process_cpu_bf16_runs_with_fastcls_optimizer_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bf16_weights.applies(cpu, "bf16", 1, False, False)
    assert not bf16_weights.applies(cpu, "fp32", 1, False, False)
    assert not bf16_weights.applies(cpu, "bf16", 2, False, False)  # a bf16 sum over micro-steps would round
    assert not bf16_weights.applies(cpu, "bf16", 1, True, False)
    assert not bf16_weights.applies(cpu, "bf16", 1, False, True)
    assert not bf16_weights.applies(cuda, "bf16", 1, False, False)


def test_bf16_weights_need_master_weights():
    model = classifier()
    with pytest.raises(ValueError, match="master_weights"):
        Bf16Weights(model, FusedAdamW(param_groups(model, 0.01), lr=1e-3))
