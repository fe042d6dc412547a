"""--pooling mean: the pooled vector equals the mean of the transformers model's own last hidden states over the
attention mask, on both batch layouts, through the model's own forward, with task layers and with every layer
frozen, gradients included; training, the run folder, fastcls.load and the export (transformers' custom code)
keep the pooling."""
import inspect
import json

import pytest
import torch
from tiny import encoded_rows, make_tiny_encoder, sst2_rows, tiny_encoder, write_tsv
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, pipeline

import fastcls
from fastcls.cli import main
from fastcls.components.checkpoint import load_run
from fastcls.config import TrainConfig
from fastcls.data import collate, read_examples, tokenize_examples
from fastcls.export import export_hf
from fastcls.models.classifier import EncoderClassifier
from fastcls.models.encoder import LayerwiseEncoder, OwnForwardEncoder
from fastcls.models.families import encoder_layers
from fastcls.models.pooling import mean_pool
from fastcls.models.task_layers import TaskLayers, encoder_for_task
from fastcls.trainer import train

LENGTHS = [7, 1, 12, 4, 9]
ROWS = [2, 0, 4, 1, 3]


def batch_of(family, packed, seed=0):
    encoded = encoded_rows(LENGTHS, seed=seed, token_types=family == "bert")
    return collate(encoded, ROWS, packed=packed, pad_token_id=1)


def reference_mean(encoder, batch):
    """The transformers forward's last hidden states, averaged over the attention mask."""
    inputs = batch.padded_inputs()
    takes = inspect.signature(encoder.forward).parameters
    hidden = encoder(**{k: v for k, v in inputs.items() if k in takes}).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def mean_model(family, layers=3, dropout=0.0, dtype=torch.float64, packed=False, kernels=True):
    encoder = tiny_encoder(family, dropout, layers)
    return EncoderClassifier(encoder, 3, dropout, packed=packed, kernels=kernels, pooling="mean").to(dtype)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "mpnet"])
def test_mean_pooling_equals_the_models_own_hidden_states_averaged(family, packed):
    if family == "mpnet" and packed:
        pytest.skip("MPNet runs its own forward, on padded batches only")
    model = mean_model(family, packed=packed).eval()
    assert isinstance(model.body, OwnForwardEncoder if family == "mpnet" else LayerwiseEncoder)
    batch = batch_of(family, packed)
    with torch.no_grad():
        got = model.body.pooled(batch)
        expected = reference_mean(model.encoder, batch_of(family, packed=False))
    assert got.shape == (len(ROWS), 32) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("kernels", "checkpointing"), [(False, False), (False, True), (True, False)],
                         ids=["torch-ops", "torch-ops-checkpointed", "kernels"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_mean_pooling_gradients_equal_the_references(family, packed, kernels, checkpointing):
    """float64, every parameter's gradient against autograd through the transformers forward and the masked mean
    (fastcls's LayerNorm kernels are exact to fp32's precision only, also on float64 tensors)."""
    if family == "mpnet" and packed:
        pytest.skip("MPNet runs its own forward, on padded batches only")
    model = mean_model(family, packed=packed, kernels=kernels).train()
    if checkpointing:
        model.enable_checkpointing()
    batch = batch_of(family, packed)
    weights = torch.randn(len(ROWS), 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (model.body.pooled(batch) * weights).sum().backward()
    got = {name: p.grad.clone() for name, p in model.encoder.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (reference_mean(model.encoder, batch_of(family, packed=False)) * weights).sum().backward()
    expected = {name: p.grad for name, p in model.encoder.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and len(got) > 10
    tol = {"atol": 1e-5, "rtol": 1e-5} if kernels else {"atol": 1e-10, "rtol": 1e-9}
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, **tol, msg=name)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_every_layer_frozen_pools_the_frozen_output(packed):
    model = mean_model("bert", packed=packed)
    model.freeze(True, 3)
    batch = batch_of("bert", packed)
    with torch.no_grad():
        expected = reference_mean(model.encoder, batch_of("bert", packed=False))
        torch.testing.assert_close(model.body.pooled(batch), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "loop"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_task_layers_pool_each_tasks_mean(family, packed, batched):
    encoder = tiny_encoder(family, 0.0, 3).double()
    task_layers = TaskLayers.from_encoder(encoder, 2, 1)
    task_layers.batched = batched
    with torch.no_grad():
        for p in task_layers.copies[1].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 0.2)
    body = LayerwiseEncoder(encoder, kernels=False, pooling="mean")
    body.use_task_layers(task_layers)
    batch = batch_of(family, packed)
    weights = torch.randn(2, len(ROWS), 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = body.pooled(batch)
    assert got.shape == (2, len(ROWS), 32)
    (got * weights).sum().backward()
    shared = {name: torch.zeros_like(p) for name, p in encoder.named_parameters()}
    for t in range(2):
        standalone = encoder_for_task(encoder, task_layers, t)
        expected = reference_mean(standalone, batch_of(family, packed=False))
        torch.testing.assert_close(got[t], expected, atol=1e-12, rtol=1e-12)
        (expected * weights[t]).sum().backward()
        for (name, p), ref in zip(task_layers.copies[t][0].named_parameters(),
                                  encoder_layers(standalone)[-1].parameters(), strict=True):
            torch.testing.assert_close(p.grad, ref.grad, atol=1e-10, rtol=1e-9, msg=name)
        for name, p in standalone.named_parameters():
            if name in shared and p.grad is not None:
                shared[name] += p.grad
    for name, p in encoder.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, shared[name], atol=1e-10, rtol=1e-9, msg=name)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_bf16_hidden_states_are_summed_in_fp32(packed):
    batch = batch_of("bert", packed)
    h = torch.randn(batch.num_tokens, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16) * 50 + 100
    got = mean_pool(h, batch)
    assert got.dtype == torch.bfloat16
    padded_mask = batch.key_mask
    tokens = h.float()
    expected = torch.stack([tokens[batch.cls_index[r]:batch.cls_index[r] + int(padded_mask[r].sum())].mean(0)
                            for r in range(batch.num_rows)]) if packed else \
        torch.stack([tokens.view(batch.num_rows, batch.max_len, -1)[r, padded_mask[r]].mean(0)
                     for r in range(batch.num_rows)])
    assert torch.equal(got, expected.to(torch.bfloat16))
