"""fastcls.patch swaps an encoder's dropouts for the mask-free kernel without changing what the model is."""
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fastcls import patching
from fastcls.components.activation_memory import saved_activation_bytes
from fastcls.ops import Dropout
from fastcls.patching import fastcls_attention, patch, unpatch

SMALL = {"vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 37, "max_position_embeddings": 64, "pad_token_id": 0}


def tiny(model_type):
    torch.manual_seed(0)
    if model_type == "distilbert":
        config = AutoConfig.for_model("distilbert", vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                      max_position_embeddings=64, pad_token_id=0)
    else:
        config = AutoConfig.for_model(model_type, **SMALL)
    return AutoModel.from_config(config)


def inputs(batch=3, length=11):
    torch.manual_seed(1)
    ids = torch.randint(1, 99, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("model_type", ["bert", "roberta", "xlm-roberta", "electra", "distilbert"])
def test_patched_model_in_eval_mode_matches_and_keeps_its_state_dict(model_type):
    model = tiny(model_type).eval()
    ids, mask = inputs()
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    patched = patch(model)
    assert any("dropout" in name for name in patched)
    assert not any(type(m) is nn.Dropout for m in model.modules())
    got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    restored = unpatch(model)
    assert sorted(restored) == sorted(p.replace("sdpa -> fastcls", "fastcls -> sdpa") for p in patched)
    assert not any(isinstance(m, Dropout) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_patched_model_trains_and_saves_the_original_config(tmp_path):
    model = tiny("bert").train()
    patch(model)
    ids, mask = inputs()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    out[:, 0].square().sum().backward()
    grads = [p.grad for name, p in model.named_parameters() if not name.startswith("pooler.")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.config.save_pretrained(tmp_path)
    assert "fastcls" not in (tmp_path / "config.json").read_text()


def test_attention_math_path_matches_sdpa(monkeypatch):
    # with the dropout made the identity, the CPU math path must equal SDPA without dropout
    import fastcls.models.attention as attention_module

    monkeypatch.setattr(attention_module, "mask_free_dropout", lambda x, p, training: x)
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    module = nn.Module()
    module.is_causal = False
    for mask in (None, torch.rand(2, 1, 9, 9) > 0.3, torch.randn(2, 1, 9, 9)):
        if mask is not None and mask.dtype == torch.bool:
            mask[..., 0] = True  # every query keeps one key
        expected, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
        got, _ = fastcls_attention(module, q, k, v, mask, dropout=0.1, scaling=0.3)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


CLASSIFIERS = ["bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert"]


def tiny_classifier(model_type, **overrides):
    torch.manual_seed(0)
    if model_type == "distilbert":
        config = AutoConfig.for_model("distilbert", vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37,
                                      max_position_embeddings=64, pad_token_id=0, **overrides)
    else:
        config = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    return AutoModelForSequenceClassification.from_config(config)


def fused_forward_modules(model):
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


@pytest.mark.parametrize("model_type", CLASSIFIERS)
def test_fused_blocks_give_the_same_logits_and_state_dict(model_type):
    model = tiny_classifier(model_type).eval()
    ids, mask = inputs()
    expected = model(input_ids=ids, attention_mask=mask).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    parameters = dict(model.named_parameters())
    patched = patch(model)
    assert patch(model) == []  # patching twice changes nothing more
    fused = [name for name in patched if name.endswith("fused)")]
    n_layers = 2
    # the embeddings, and per layer the attention output and feed-forward output (one DistilBERT block each)
    assert len(fused) == 1 + n_layers * (1 if model_type == "distilbert" else 2)
    got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert dict(model.named_parameters()) == parameters  # the same objects
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    restored = unpatch(model)
    assert set(fused) <= set(restored)
    assert fused_forward_modules(model) == []
    assert not any("_fastcls" in key for m in model.modules() for key in m.__dict__)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_fused_blocks_train_like_the_original_without_dropout(model_type):
    """With every dropout rate 0 the training step is deterministic: the fused backward gives the original
    gradients."""
    zero = {"dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0} if model_type == "distilbert" else \
        {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    ids, mask = inputs()
    labels = torch.tensor([0, 1, 1])
    gradients = []
    for fuse in (False, True):
        model = tiny_classifier(model_type, **zero).train()
        if fuse:
            patch(model)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_patched_training_step_keeps_less_for_the_backward():
    torch.manual_seed(5)
    batch, length, hidden, n_layers = 4, 16, 32, 2
    ids = torch.randint(1, 99, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    unpatched_model = tiny_classifier("bert").train()
    unpatched = saved_activation_bytes(
        unpatched_model, lambda: unpatched_model(input_ids=ids, attention_mask=mask).logits)
    model = tiny_classifier("bert").train()
    patch(model)
    patched = saved_activation_bytes(model, lambda: model(input_ids=ids, attention_mask=mask).logits)
    tokens = batch * length
    # per fused block torch keeps a byte mask and the fp32 pre-norm sum; the embeddings' dropout a byte mask
    at_least = 2 * n_layers * tokens * hidden * (1 + 4) + tokens * hidden
    assert unpatched - patched >= at_least, (unpatched, patched)


def test_patched_model_with_gradient_checkpointing_redraws_the_same_masks():
    """Checkpointing replays a layer's forward with torch's RNG state restored, so the fused ops draw the same
    seeds: the gradients equal those without checkpointing."""
    ids, mask = inputs()
    labels = torch.tensor([1, 0, 1])
    gradients = []
    for checkpointing in (False, True):
        model = tiny_classifier("bert").train()
        patch(model)
        if checkpointing:
            # transformers renamed the method after 5.17 (the GPU machine's version)
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        torch.manual_seed(11)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        gradients.append([p.grad for p in model.parameters()])
    for with_checkpoints, without in zip(gradients[1], gradients[0]):
        torch.testing.assert_close(with_checkpoints, without, atol=1e-6, rtol=1e-5)


def test_patched_model_under_the_hf_trainer_saves_and_loads_as_the_original(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_classifier("bert")
    patch(model)
    torch.manual_seed(3)
    rows = [{"input_ids": torch.randint(1, 99, (12,)), "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(8)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows).train()
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in before.items())  # it trained
    assert len(fused_forward_modules(model)) > 0  # still patched
    model.eval()
    ids, mask = inputs()
    patched_logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, patched_logits, atol=1e-5,
                               rtol=1e-5)
    unpatch(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, patched_logits, atol=1e-5,
                               rtol=1e-5)


def test_bundled_minilm_patched_in_eval_mode_matches():
    from fastcls.config import bundled_model_path

    # fp32 whatever the stored weights: the GPU machine's stand-in stores them in bf16
    model = AutoModel.from_pretrained(bundled_model_path(), dtype=torch.float32).eval()
    ids, mask = inputs(length=9)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        names = patch(model)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert sum(name.endswith("fused)") for name in names) == 1 + 2 * model.config.num_hidden_layers
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
