"""The [CLS] head (dropout, linear, softmax cross-entropy) against the same computation in float64, and the model's
fused head against its PyTorch reference."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from fastcls.data import Encoded, collate
from fastcls.models.classifier import EncoderClassifier
from fastcls.ops import classification_head
from fastcls.ops.dropout import keep_mask, kept_scale

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def random_head(batch, length, dim, n_classes, dtype, device, generator):
    hidden = torch.randn(batch, length, dim, generator=generator).to(dtype)
    weight = (torch.randn(n_classes, dim, generator=generator) * dim**-0.5).to(dtype)
    bias = (torch.randn(n_classes, generator=generator) * 0.1).to(dtype)
    target = torch.randint(0, n_classes, (batch,), generator=generator)
    return hidden.to(device), weight.to(device), bias.to(device), target.to(device)


def assert_close(actual, expected, tol):
    assert actual.shape == expected.shape
    error = (actual.detach().double().cpu() - expected.detach().double().cpu()).norm()
    scale = expected.detach().double().cpu().norm()
    assert error <= tol * max(scale, 1e-30), f"relative error {error / scale:.3g} exceeds {tol:g}"


def float64_head(hidden, linear_weight, bias, target, p, seed, **options):
    """The head by hand in float64, with the mask every fastcls backend draws for this seed."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, linear_weight, bias)]
    h_cls = leaves[0][:, 0] if hidden.ndim == 3 else leaves[0]
    if p > 0:
        h_cls = torch.where(keep_mask(h_cls.shape, p, seed, hidden.device), h_cls * kept_scale(p), 0.0)
    logits = F.linear(h_cls, leaves[1], leaves[2])
    loss = F.cross_entropy(logits, target, **options)
    return loss, logits, leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("rank", [3, 2], ids=["sequences", "cls_rows"])
def test_matches_float64(backend, rank, p, dtype, generator):
    name, device = backend
    hidden, weight, bias, target = random_head(6, 5, 32, 3, dtype, device, generator)
    if rank == 2:
        hidden = hidden[:, 0].contiguous()
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, logits = classification_head(*leaves, target, dropout_p=p, seed=1234, backend=name)
    loss.backward()
    expected_loss, expected_logits, expected_leaves = float64_head(hidden, weight, bias, target, p, 1234)
    expected_loss.backward()
    tol = TOLERANCE[dtype]
    assert loss.dtype == torch.float32 and logits.dtype == dtype
    assert_close(loss, expected_loss, tol)
    assert_close(logits, expected_logits, tol)
    for leaf, expected in zip(leaves, expected_leaves):
        assert leaf.grad.dtype == dtype
        assert_close(leaf.grad, expected.grad, tol)
    if rank == 3:  # only the [CLS] rows reach the encoder's gradient
        assert torch.all(leaves[0].grad[:, 1:] == 0)
        assert leaves[0].grad[:, 0].abs().sum() > 0


def test_options_and_eval_mode(backend, generator):
    name, device = backend
    hidden, weight, bias, target = random_head(8, 4, 16, 5, torch.float32, device, generator)
    target[2] = -100
    class_weight = (torch.rand(5, generator=generator) + 0.5).to(device)
    options = {"weight": class_weight.double(), "label_smoothing": 0.1, "reduction": "sum"}
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, _ = classification_head(*leaves, target, dropout_p=0.5, training=False, class_weight=class_weight,
                                  label_smoothing=0.1, reduction="sum", backend=name)
    loss.backward()
    expected_loss, _, expected_leaves = float64_head(hidden, weight, bias, target, 0.0, 0, **options)
    expected_loss.backward()
    assert_close(loss, expected_loss, 1e-5)
    for leaf, expected in zip(leaves, expected_leaves):
        assert_close(leaf.grad, expected.grad, 1e-5)


def test_same_seed_same_result_on_every_backend(backend, generator):
    hidden, weight, bias, target = random_head(4, 3, 16, 4, torch.float32, backend[1], generator)
    loss, logits = classification_head(hidden, weight, bias, target, dropout_p=0.4, seed=99, backend=backend[0])
    reference = classification_head(hidden, weight, bias, target, dropout_p=0.4, seed=99, backend="reference")
    assert_close(logits, reference[1], 1e-6)
    assert_close(loss, reference[0], 1e-6)


def test_bad_shapes_name_the_argument(generator):
    hidden, weight, bias, target = random_head(4, 3, 16, 4, torch.float32, "cpu", generator)
    with pytest.raises(ValueError, match="hidden_states must be"):
        classification_head(hidden[None], weight, bias, target, dropout_p=0.1)
    with pytest.raises(ValueError, match="weight must be"):
        classification_head(hidden, weight.t(), bias, target, dropout_p=0.1)


def tiny_classifier(dropout: float, head_impl: str = "fused") -> EncoderClassifier:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return EncoderClassifier(BertModel(config, add_pooling_layer=False), num_labels=3, dropout=dropout,
                             head_impl=head_impl)


def _batch(generator, rows, length, labels=True):
    input_ids = torch.randint(2, 50, (rows * length,), generator=generator).numpy().astype("int32")
    lengths = np.full(rows, length)
    target = torch.randint(0, 3, (rows,), generator=generator).numpy() if labels else np.full(rows, -1)
    encoded = Encoded(input_ids=input_ids, lengths=lengths, token_type_ids=None, labels=target, num_truncated=0,
                      max_length=length)
    return collate(encoded, list(range(rows)), packed=False)


def test_model_fused_head_matches_the_reference_head():
    """Same loss, logits and gradients from both head implementations (no dropout, so both see the same
    inputs); the head's state_dict keys are a plain linear layer's."""
    generator = torch.Generator().manual_seed(5)
    batch = _batch(generator, 4, 7)
    results = {}
    for head_impl in ("reference", "fused"):
        model = tiny_classifier(dropout=0.0, head_impl=head_impl).train()
        loss, logits = model(batch)
        loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        results[head_impl] = (loss.detach(), logits.detach(), grads)
    (ref_loss, ref_logits, ref_grads), (loss, logits, grads) = results["reference"], results["fused"]
    assert_close(loss, ref_loss, 1e-6)
    assert_close(logits, ref_logits, 1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:  # some encoder gradients are ~1e-13 here: compare with an absolute floor
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-8)
    assert {k for k in model.state_dict() if k.startswith("head.")} == {"head.linear.weight", "head.linear.bias"}
    unlabelled = dataclasses.replace(batch, labels=None)
    no_loss, same_logits = model.eval()(unlabelled)
    assert no_loss is None and torch.equal(same_logits, logits)


def test_model_fused_head_applies_the_head_dropout_only_in_training():
    model = tiny_classifier(dropout=0.5)
    batch = _batch(torch.Generator().manual_seed(6), 8, 5)
    model.eval()
    _, eval_logits = model(batch)
    assert torch.equal(eval_logits, model(dataclasses.replace(batch, labels=None))[1])
    model.train()
    _, train_logits = model(batch)
    assert not torch.allclose(train_logits, eval_logits)
    with pytest.raises(ValueError, match="head impl"):
        tiny_classifier(dropout=0.1, head_impl="fast")


def test_large_label_spaces_train_through_the_fused_linear_cross_entropy(monkeypatch):
    """From LARGE_LABEL_SPACE classes on, a training step runs linear_cross_entropy (no logits returned) and
    gives the loss and gradients of the plain head; evaluation still returns logits."""
    import fastcls.models.head as head_module

    monkeypatch.setattr(head_module, "LARGE_LABEL_SPACE", 3)
    calls = []
    real = head_module.linear_cross_entropy
    monkeypatch.setattr(head_module, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = _batch(torch.Generator().manual_seed(7), 6, 5)
    results = []
    for head_impl in ("fused", "reference"):
        model = tiny_classifier(dropout=0.0, head_impl=head_impl).train()
        loss, logits = model(batch)
        loss.backward()
        results.append((loss.detach(), logits, {n: p.grad for n, p in model.named_parameters()}))
    (loss, logits, grads), (ref_loss, _, ref_grads) = results
    assert calls == [1] and logits is None
    assert_close(loss, ref_loss, 1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-8)
    model.eval()
    assert model(batch)[1].shape == (6, 3)
