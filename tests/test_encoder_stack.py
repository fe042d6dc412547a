"""A training step's trainable layers as one autograd node (fastcls.ops.encoder_stack) against the same layers run
one node each: the same loss and gradients bit for bit (the same kernels on the same inputs, the same dropout
masks), with dropout on, fp32 or bf16 weights, LayerNorms saving their output or their sum, epsilons apart, the
[CLS]-only last layer or every token's; and where it does not run."""
import importlib

import pytest
import torch
from test_encoder_layer import assert_same_step, batch, tiny_model, variant_model

from fastcls.models import encoder as encoder_module
from fastcls.ops import cpp
from fastcls.ops.dropout import DropoutGenerator, use_generator

pytestmark = pytest.mark.skipif(not cpp.ENCODER_LAYER_BUILT,
                                reason="the one-call layers are built with the avx512_bf16 kernels")


@pytest.fixture(autouse=True)
def any_row_count(monkeypatch):
    monkeypatch.setattr(importlib.import_module("fastcls.ops.linear"), "MIN_ROWS", 1)


def step(model, stacked, seed=11, checkpointing=False, pooled=None):
    """(loss, gradients) of one training step, the layers as one node or one node each; (stack calls, layer calls)
    go to `pooled` when given."""
    calls = {"stack": 0, "layer": 0}
    real_stack, real_layer = encoder_module.encoder_stack, encoder_module.encoder_layer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encoder_module, "ENCODER_STACK", stacked)
        patch.setattr(encoder_module, "encoder_stack",
                      lambda *a: calls.__setitem__("stack", calls["stack"] + 1) or real_stack(*a))
        patch.setattr(encoder_module, "encoder_layer",
                      lambda *a: calls.__setitem__("layer", calls["layer"] + 1) or real_layer(*a))
        if checkpointing:
            model.body.enable_checkpointing()
        model.zero_grad(set_to_none=True)
        with use_generator(DropoutGenerator(seed)), torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(batch())
            loss.backward()
    if pooled is not None:
        pooled.update(calls)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", ["fp32 weights", "bf16 weights", "sums saved", "epsilons apart", "mean pooling"])
def test_stack_equals_layer_by_layer_bit_for_bit(variant):
    model = variant_model(variant)
    if variant == "mean pooling":  # every token's output from the last layer, not the [CLS] rows' alone
        model.body.pooling = "mean"
    calls = {}
    stacked = step(model, True, pooled=calls)
    assert calls == {"stack": 1, "layer": 0}
    assert_same_step(stacked, step(model, False, pooled=calls))
    assert calls == {"stack": 0, "layer": 3}
    assert len(stacked[1]) == sum(1 for p in model.parameters() if p.requires_grad)


def test_two_steps_with_updates_equal_layer_by_layer():
    """Weights updated in place between steps (their packs redone) and a second step's masks: the same bits."""
    results = []
    for stacked in (True, False):
        model = tiny_model(layers=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for seed in (5, 6):
            loss, grads = step(model, stacked, seed=seed)
            optimizer.step()
        results.append((loss, grads, [p.detach().clone() for p in model.parameters()]))
    assert_same_step(results[0][:2], results[1][:2])
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


def test_where_it_does_not_run():
    calls = {}
    model = tiny_model(layers=3)
    step(model, True, checkpointing=True, pooled=calls)  # each layer recomputed on its own
    assert calls == {"stack": 0, "layer": 6}
    model = tiny_model(layers=3)
    for p in model.encoder.encoder.layer[1].attention.self.query.parameters():
        p.requires_grad_(False)  # a frozen product: the layers' own nodes skip its gradient
    step(model, True, pooled=calls)
    assert calls == {"stack": 0, "layer": 3}
    model = tiny_model(layers=3)
    model.freeze(embeddings=True, layers=2)  # one trainable layer, its input without gradient
    step(model, True, pooled=calls)
    assert calls["stack"] == 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # evaluation
        model.eval()(batch())


def test_a_failed_forward_leaves_no_pack_unfilled(monkeypatch):
    """A stack whose second layer fails before any kernel ran, then the same layers again in the same forward pass
    (so the weights' packs are not rebuilt for a new pass): the packs whose packing never ran are built again, and
    the output equals a fresh pass's."""
    model = tiny_model(layers=3)
    body, rows = model.body, batch()
    real, seen = cpp.encoder_layer_forward, []

    def failing(*args, **kwargs):
        seen.append(1)
        if len(seen) == 2:
            raise ValueError("refused")
        return real(*args, **kwargs)

    with use_generator(DropoutGenerator(3)) as generator, torch.autocast("cpu", dtype=torch.bfloat16):
        h = body.embed(rows).detach().requires_grad_()
        encoder_module.new_forward_pass()
        with monkeypatch.context() as patch:
            patch.setattr(cpp, "encoder_layer_forward", failing)
            with pytest.raises(ValueError, match="refused"):
                encoder_module.run_layers(body.layers, h, rows, True, True)
        generator.end_step()
        again = generator.state.clone(), encoder_module.run_layers(body.layers, h, rows, True, True)
        generator.state.copy_(again[0])
        generator.step_counters = 0
        encoder_module.new_forward_pass()
        fresh = encoder_module.run_layers(body.layers, h, rows, True, True)
    assert torch.equal(again[1], fresh)


def test_layers_of_different_feed_forward_widths():
    """A wider feed-forward block in a later layer: the one scratch the layers share fits the widest."""
    model = tiny_model(layers=3)
    torch.manual_seed(4)
    layer = model.encoder.encoder.layer[1]
    layer.intermediate.dense, layer.output.dense = torch.nn.Linear(32, 160), torch.nn.Linear(160, 32)
    for body_layer in model.body.layers:  # the encoder's view of its layers' parts
        body_layer.__init__(body_layer.module, "bert")
    calls = {}
    stacked = step(model, True, pooled=calls)
    assert calls == {"stack": 1, "layer": 0}
    assert_same_step(stacked, step(model, False))
