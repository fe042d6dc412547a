"""The [CLS] head (dropout, linear, softmax cross-entropy) against the same computation in float64, and the model's
fused head against its PyTorch reference."""
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from fastcls.model import EncoderClassifier
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


def tiny_classifier(dropout: float) -> EncoderClassifier:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return EncoderClassifier(BertModel(config, add_pooling_layer=False), num_labels=3, dropout=dropout)


def test_model_fused_head_matches_the_reference_head():
    """Same loss, logits and gradients from both head_impl values (no dropout, so both see the same inputs);
    state_dict keys are those of the plain modules."""
    model = tiny_classifier(dropout=0.0).train()
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(1, 50, (4, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 3, (4,), generator=generator)
    results = {}
    for head_impl in ("reference", "fused"):
        model.zero_grad()
        loss, logits = model.loss_and_logits(input_ids, attention_mask, labels, head_impl=head_impl)
        loss.backward()
        grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        results[head_impl] = (loss.detach(), logits.detach(), grads)
    (ref_loss, ref_logits, ref_grads), (loss, logits, grads) = results["reference"], results["fused"]
    assert_close(loss, ref_loss, 1e-6)
    assert_close(logits, ref_logits, 1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:  # some encoder gradients are ~1e-13 here: compare with an absolute floor
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-8)
    assert {"dropout", "classifier.weight", "classifier.bias"} & set(model.state_dict()) == {
        "classifier.weight", "classifier.bias"}
    assert torch.equal(model(input_ids, attention_mask), logits)


def test_model_fused_head_applies_the_head_dropout_only_in_training():
    model = tiny_classifier(dropout=0.5)
    generator = torch.Generator().manual_seed(6)
    input_ids = torch.randint(1, 50, (8, 5), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 3, (8,), generator=generator)
    model.eval()
    _, eval_logits = model.loss_and_logits(input_ids, attention_mask, labels)
    assert torch.equal(eval_logits, model(input_ids, attention_mask))
    model.train()
    _, train_logits = model.loss_and_logits(input_ids, attention_mask, labels)
    assert not torch.allclose(train_logits, eval_logits)
    with pytest.raises(ValueError, match="head_impl"):
        model.loss_and_logits(input_ids, attention_mask, labels, head_impl="fast")
