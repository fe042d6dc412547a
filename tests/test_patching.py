"""fastcls.patch swaps an encoder's dropouts for the mask-free kernel without changing what the model is."""
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import fastcls.patching as patching
from fastcls.ops import Dropout
from fastcls.patching import fastcls_attention, patch, unpatch

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=64, pad_token_id=0)


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


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "distilbert"])
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
    monkeypatch.setattr(patching, "mask_free_dropout", lambda x, p, training: x)
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
