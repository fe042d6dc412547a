"""The encoder layer as one autograd node (fastcls.ops.encoder_layer) against the same layer composed of the separate
ops: the same loss and gradients bit for bit (the same kernels on the same inputs, the same dropout masks), with
dropout on, fp32 or bf16 weights, LayerNorms that save their output or their sum, frozen parameters and inputs,
and under activation checkpointing; and where it does not run."""
import importlib

import pytest
import torch
from tiny import encoded_rows
from transformers import AutoConfig, AutoModel

from fastcls.data import collate
from fastcls.models import encoder as encoder_module
from fastcls.models.classifier import EncoderClassifier
from fastcls.ops import cpp
from fastcls.ops.dropout import DropoutGenerator, use_generator
from fastcls.ops.encoder_layer import encoder_layer_applies

linear_module = importlib.import_module("fastcls.ops.linear")
pytestmark = pytest.mark.skipif(not cpp.LINEAR_BUILT, reason="the avx512_bf16 kernels are not built or not run here")


@pytest.fixture(autouse=True)
def any_row_count(monkeypatch):
    monkeypatch.setattr(linear_module, "MIN_ROWS", 1)


def tiny_model(dropout=0.1, layers=3, bf16_weights=False, seed=0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("bert", vocab_size=99, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                  pad_token_id=1, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = EncoderClassifier(AutoModel.from_config(config), num_labels=3, dropout=0.0, packed=True).train()
    with torch.no_grad():  # weights off their initial values: nonzero biases and LayerNorm weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if bf16_weights:
        for module in model.modules():
            if type(module) is torch.nn.Linear:
                module.to(torch.bfloat16)
    return model


def variant_model(variant: str, layers: int = 3):
    """tiny_model with bf16 weights, LayerNorm weights with a zero (their sums saved), or the two LayerNorms'
    epsilons apart, as `variant` says."""
    model = tiny_model(layers=layers, bf16_weights=variant == "bf16 weights")
    with torch.no_grad():
        for i, layer in enumerate(model.encoder.encoder.layer):
            if variant == "sums saved":
                layer.attention.output.LayerNorm.weight[i + 1] = 0.0
                layer.output.LayerNorm.weight[i + 3] = 0.0
            if variant == "epsilons apart":
                layer.attention.output.LayerNorm.eps, layer.output.LayerNorm.eps = 1e-3, 1e-6
    return model


def batch(seed=3, lengths=(7, 1, 12, 4, 9, 30)):
    encoded = encoded_rows(list(lengths), seed=seed)
    return collate(encoded, [4, 2, 1, 0, 3, 5], packed=True, pad_token_id=1, labels=True)


def step(model, fused, seed=11, checkpointing=False, lengths=(7, 1, 12, 4, 9, 30)):
    """The loss and gradients of one training step with the layer fused or composed, the dropout masks drawn from
    a generator seeded alike; asserts which path ran."""
    calls = []
    real = encoder_module.encoder_layer

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encoder_module, "ENCODER_STACK", False)  # layer by layer (tests/test_encoder_stack.py: as one)
        patch.setattr(encoder_module, "encoder_layer", counted)
        if not fused:
            patch.setattr(encoder_module, "encoder_layer_applies", lambda *args: False)
        if checkpointing:
            model.body.enable_checkpointing()
        model.zero_grad(set_to_none=True)
        with use_generator(DropoutGenerator(seed)), torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model(batch(lengths=lengths))
            loss.backward()
    layers = len(model.body.layers)
    # every layer, the [CLS]-only last one included; checkpointing runs each forward again in the backward
    assert len(calls) == (layers * (2 if checkpointing else 1) if fused else 0)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(fused, composed, trained=None):
    (loss, grads), (ref_loss, ref_grads) = fused, composed
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    if trained is not None:
        assert grads.keys() == trained
    for name, grad in grads.items():
        assert grad.dtype == ref_grads[name].dtype and torch.equal(grad, ref_grads[name]), name


@pytest.mark.parametrize("bf16_weights", [False, True])
def test_fused_layer_step_equals_the_separate_ops_bit_for_bit(bf16_weights):
    model = tiny_model(bf16_weights=bf16_weights)
    fused = step(model, True)
    assert_same_step(fused, step(model, False))
    assert any("layer.0.attention.self.query.bias" in name for name in fused[1])


@pytest.mark.skipif(not cpp.ENCODER_LAYER_BUILT, reason="the one-call layer is built with the avx512_bf16 kernels")
@pytest.mark.parametrize("variant", ["bf16 weights", "fp32 weights", "sums saved", "epsilons apart"])
def test_one_call_equals_the_kernels_called_one_by_one(variant, monkeypatch):
    """A training step's layer forward and backward as one C++ call each (csrc/encoder_layer.h) against the node
    calling the same kernels one by one: the same bits, with dropout, odd token counts, widths off the products'
    48-column panels, LayerNorms saving their output or their sum, and the two LayerNorms' epsilons apart."""
    model = variant_model(variant)
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        real = getattr(cpp, f"encoder_layer_{name}")
        monkeypatch.setattr(cpp, f"encoder_layer_{name}",
                            lambda *args, name=name, real=real, **kwargs:
                            calls.__setitem__(name, calls[name] + 1) or real(*args, **kwargs))
    one_call = step(model, True)  # 63 tokens: an odd count, thread shares uneven
    assert calls == {"forward": 3, "backward": 3}  # every layer, the [CLS]-only last one included
    monkeypatch.setattr(cpp, "ENCODER_LAYER_BUILT", False)
    assert_same_step(one_call, step(model, True))
    assert calls == {"forward": 3, "backward": 3}


def test_layer_norm_saving_its_sum():
    """A LayerNorm weight with a zero: its output cannot stand in for the normalised input, so the sum is saved."""
    model = tiny_model()
    with torch.no_grad():
        model.encoder.encoder.layer[0].attention.output.LayerNorm.weight[3] = 0.0
        model.encoder.encoder.layer[1].output.LayerNorm.weight[5] = 0.0
    assert_same_step(step(model, True), step(model, False))


def test_frozen_parameters_and_input_without_gradient():
    """Frozen embeddings (the first layer's input takes no gradient) and some frozen weights and biases."""
    model = tiny_model()
    frozen = ["embeddings", "layer.0.attention.self.key.weight", "layer.1.intermediate.dense.bias",
              "layer.0.output.LayerNorm.weight", "layer.1.attention.self.value.bias"]
    for name, p in model.named_parameters():
        p.requires_grad_(not any(part in name for part in frozen))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert_same_step(step(model, True), step(model, False), trained)


def test_biases_alone_trained():
    """BitFit: every weight frozen, the biases trained (rows enough for several blocks of the column sums)."""
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("bias"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    lengths = (60, 33, 50, 7, 45, 61)
    assert_same_step(step(model, True, lengths=lengths), step(model, False, lengths=lengths), trained)


def test_a_frozen_layer_under_trained_embeddings():
    """A layer whose parameters all are frozen still passes the gradient down to trained embeddings."""
    model = tiny_model()
    for p in model.encoder.encoder.layer[0].parameters():
        p.requires_grad_(False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    fused = step(model, True)
    assert_same_step(fused, step(model, False), trained)
    assert "encoder.embeddings.word_embeddings.weight" in fused[1]


def test_checkpointed_layers_equal_the_plain_step():
    plain = step(tiny_model(), True)
    assert_same_step(step(tiny_model(), True, checkpointing=True), plain)


def test_where_it_does_not_run():
    model = tiny_model()
    part = model.body.layers[0]
    linears = (part.query, part.key, part.value, part.attn_out, part.ffn_in, part.ffn_out)
    norms = (part.attn_norm, part.out_norm)
    h = torch.randn(10, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert encoder_layer_applies(h, linears, norms, 4, (0.1, 0.1, 0.1))
        with torch.no_grad():  # evaluation composes the ops: no autograd node to save
            assert not encoder_layer_applies(h, linears, norms, 4, (0.1, 0.1, 0.1))
        assert not encoder_layer_applies(h, linears, norms, 4, (0.1, 1.0, 0.1))  # p = 1
        assert not encoder_layer_applies(h, linears, norms, 3, (0.1, 0.1, 0.1))  # heads not dividing the width
    assert not encoder_layer_applies(h, linears, norms, 4, (0.1, 0.1, 0.1))  # fp32 products: F.linear's
    adapted = (*linears[:5], torch.nn.Sequential(part.ffn_out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not encoder_layer_applies(h, adapted, norms, 4, (0.1, 0.1, 0.1))


def test_the_next_layer_reads_the_bf16_copy_while_the_output_is_unchanged(monkeypatch):
    """A fused layer's LayerNorm writes its fp32 output's bf16 copy for the next layer's products: that copy is
    the output rounded, and an in-place change to the output makes the next layer cast it afresh."""
    from fastcls.ops.encoder_layer import _bf16_of

    outputs, real = [], encoder_module.encoder_layer
    monkeypatch.setattr(encoder_module, "ENCODER_STACK", False)
    monkeypatch.setattr(encoder_module, "encoder_layer", lambda *args: outputs.append(real(*args)) or outputs[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tiny_model(layers=2)(batch())
    h = outputs[0]  # the first layer's, over every token (the last layer's holds the [CLS] rows alone)
    assert h.dtype == torch.float32 and h._fastcls_bf16[0] == h._version
    assert _bf16_of(h) is h._fastcls_bf16[1] and torch.equal(_bf16_of(h), h.detach().to(torch.bfloat16))
    assert not hasattr(outputs[1], "_fastcls_bf16")
    with torch.no_grad():
        h.mul_(3.0)
    assert _bf16_of(h) is not h._fastcls_bf16[1] and torch.equal(_bf16_of(h), h.detach().to(torch.bfloat16))


@pytest.mark.skipif(not cpp.ENCODER_LAYER_BUILT, reason="the one-call layer is built with the avx512_bf16 kernels")
def test_one_call_checks_what_it_is_handed():
    """The one-call forward runs on tensors of the shapes and dtypes it takes and refuses others before any kernel
    reads them: a wrong dtype, a pack of another weight's size, biases of mixed dtypes."""
    torch.manual_seed(0)
    width, ffn, tokens = 32, 64, 5
    h = torch.randn(tokens, width)
    packed = [cpp.linear_pack_wt([torch.randn(n, k).bfloat16()])[0]
              for n, k in ((3 * width, width), (width, width), (ffn, width), (width, ffn))]
    biases = [torch.randn(n).bfloat16() for n in (width, width, width, width, ffn, width)]
    norms = [torch.randn(width) for _ in range(4)]
    cu = torch.tensor([0, 2, 5])
    rest = (4, 0.35, (1e-12, 1e-12), [(0, 0, 0, 1.0)] * 3, (False, True))
    outputs = cpp.encoder_layer_forward(h, h.bfloat16(), cu, None, packed, biases, norms, *rest)
    assert outputs[6] is None and outputs[13] is not None and torch.isfinite(outputs[12]).all()
    with pytest.raises(ValueError, match="bf16"):
        cpp.encoder_layer_forward(h, h, cu, None, packed, biases, norms, *rest)
    with pytest.raises(ValueError, match="elements"):
        cpp.encoder_layer_forward(h, h.bfloat16(), cu, None, [packed[1], *packed[1:]], biases, norms, *rest)
    with pytest.raises(ValueError, match="bf16"):
        cpp.encoder_layer_forward(h, h.bfloat16(), cu, None, packed, [*biases[:5], biases[5].float()], norms, *rest)
    with pytest.raises(ValueError, match="cls_index"):  # a row index past the tokens: never read
        kv_packs = [packed[1], cpp.linear_pack_wt([torch.randn(2 * width, width).bfloat16()])[0], *packed[1:]]
        cpp.encoder_layer_forward(h, h.bfloat16(), cu, torch.tensor([0, 5]), kv_packs, biases, norms, *rest)
