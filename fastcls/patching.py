"""Swap a Hugging Face encoder's dropouts for fastcls's mask-free dropout kernel, in place and reversibly.

- every `nn.Dropout` module (embeddings, attention output, feed-forward output, the head) becomes
  `fastcls.ops.Dropout`, which keeps no mask and draws its bits from a counter-based generator;
- the attention-probability dropout, which transformers hands to `scaled_dot_product_attention` (on the CPU
  its math fallback draws the mask with torch's slow `bernoulli_`), runs through the "fastcls" attention
  function below: SDPA itself wherever no dropout applies or on CUDA (whose kernels drop in-register), else
  the same math with fastcls's dropout.

Modules without parameters are swapped, so `state_dict` keys and values are unchanged.
"""
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fastcls.ops import Dropout
from fastcls.ops import dropout as mask_free_dropout

ATTENTION = "fastcls"


def fastcls_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention interface: query/key/value [B, H, L, D] in, [B, L, H, D] out."""
    plain_heads = key.shape[1] == query.shape[1]
    if dropout == 0.0 or query.device.type == "cuda" or is_causal or not plain_heads or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(mask_free_dropout(probs, dropout, training=True), value)
    return out.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register(ATTENTION, fastcls_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def _configs(model: nn.Module):
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            yield config


def patch(model: nn.Module) -> list[str]:
    """Patch `model` in place; returns the names of what was swapped."""
    patched = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, child_name, Dropout(child.p).train(child.training))
                patched.append(f"{name}.{child_name}" if name else child_name)
    # kept on the model, not the config, so that a saved config.json stays the original's
    unpatched = model.__dict__.setdefault("_fastcls_unpatched_attention", [])
    for config in _configs(model):
        if config._attn_implementation in ("sdpa", "eager"):
            unpatched.append((config, config._attn_implementation))
            patched.append(f"attention ({config._attn_implementation} -> {ATTENTION})")
            config._attn_implementation = ATTENTION
    return patched


def unpatch(model: nn.Module) -> list[str]:
    """Undo `patch`; returns the names of what was restored."""
    restored = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is Dropout:
                setattr(module, child_name, nn.Dropout(child.p).train(child.training))
                restored.append(f"{name}.{child_name}" if name else child_name)
    for config, original in model.__dict__.pop("_fastcls_unpatched_attention", []):
        config._attn_implementation = original
        restored.append(f"attention ({ATTENTION} -> {original})")
    return restored
