"""Swap a Hugging Face encoder's dropouts for fastcls's mask-free dropout kernel, in place and reversibly.

- every `nn.Dropout` module (embeddings, attention output, feed-forward output, the head) becomes
  `fastcls.ops.Dropout`, which keeps no mask and draws its bits from a counter-based generator;
- the attention-probability dropout, which transformers hands to `scaled_dot_product_attention` (on the CPU
  its math fallback draws the mask with torch's slow `bernoulli_`), runs through the "fastcls" attention
  function below, which is `fastcls.models.attention.attention`, the layer-by-layer encoder's too;
- the blocks that end in LayerNorm(dropout(dense(h)) + residual) (each family's `output_blocks` in the table
  `fastcls.models.families`; DistilBERT's TransformerBlock: sa_layer_norm and output_layer_norm) run
  `fastcls.ops.dropout_add_layer_norm`, and the embeddings' dropout(LayerNorm(...)) runs
  `fastcls.ops.layer_norm_dropout`: one pass each, no mask and no pre-norm sum kept for the backward. These
  modules get an instance-level `forward` (the embeddings: their LayerNorm's, with their dropout's made the
  identity), so their classes, submodules and parameters stay the same objects; `unpatch` deletes it.

Modules without parameters are swapped, and parameters are never replaced, so `state_dict` keys and values are
unchanged: save a patched model with `state_dict` or `save_pretrained` (pickling the whole module object would
pickle the bound fused forwards, which do not unpickle).
"""
import types

from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import apply_chunking_to_forward

from fastcls.models.attention import attention
from fastcls.models.families import FAMILIES
from fastcls.ops import Dropout
from fastcls.ops.dropout_add_layer_norm import (
    MAX_HIDDEN,
    dropout_add_layer_norm,
    layer_norm_dropout,
)

ATTENTION = "fastcls"


def fastcls_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention interface: query/key/value [B, H, L, D] in, [B, L, H, D] out."""
    plain_heads = key.shape[1] == query.shape[1]
    if dropout == 0.0 or query.device.type == "cuda" or is_causal or not plain_heads or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = attention(query, key, value, attention_mask, dropout, scale=scaling)
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


# Classes whose forward code was read (transformers 5.24) and is reproduced by the fused forwards below.
# (the family's transformers package, class name): DistilBERT's embeddings class is plainly "Embeddings"
_OUTPUT_BLOCKS = {(f"transformers.models.{f.name.replace('-', '_')}.", name)
                  for f in FAMILIES.values() for name in f.output_blocks}
_EMBEDDINGS = {(f"transformers.models.{f.name.replace('-', '_')}.", name)
               for f in FAMILIES.values() for name in f.embedding_blocks}


def _listed(cls, blocks) -> bool:
    return any(cls.__module__.startswith(package) and cls.__name__ == name for package, name in blocks)

_DISTILBERT = "transformers.models.distilbert.modeling_distilbert"
_FUSED = "_fastcls_fused"  # instance attribute naming what a fused module's forward does


def _fusable_norm(norm) -> bool:
    return (type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1 and norm.weight is not None
            and norm.bias is not None and norm.normalized_shape[0] <= MAX_HIDDEN)


def _output_block_forward(self, hidden_states, input_tensor):
    """BertSelfOutput / BertOutput and kin: LayerNorm(dropout(dense(h)) + input_tensor)."""
    norm, dropout = self.LayerNorm, self.dropout
    return dropout_add_layer_norm(self.dense(hidden_states), input_tensor, norm.weight, norm.bias, dropout.p,
                                  eps=norm.eps, training=dropout.training)


def _embedding_norm_forward(self, embeddings):
    """The embeddings' LayerNorm, followed by their dropout (whose own forward is then the identity)."""
    dropout = self.__dict__["_fastcls_dropout"]
    return layer_norm_dropout(embeddings, self.weight, self.bias, dropout.p, eps=self.eps, training=dropout.training)


def _identity_forward(self, x):
    return x


def _distilbert_block_forward(self, hidden_states, attention_mask=None, **kwargs):
    """DistilBERT's TransformerBlock: the attention output has no dropout; the FFN's last dropout moves into the
    output LayerNorm (dropout is elementwise, so chunking the feed-forward before or after it is the same)."""
    attention_output, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    sa_norm = self.sa_layer_norm
    attention_output = dropout_add_layer_norm(attention_output, hidden_states, sa_norm.weight, sa_norm.bias, 0.0,
                                              eps=sa_norm.eps)
    ffn = self.ffn
    ffn_output = apply_chunking_to_forward(lambda chunk: ffn.lin2(ffn.activation(ffn.lin1(chunk))),
                                           ffn.chunk_size_feed_forward, ffn.seq_len_dim, attention_output)
    out_norm = self.output_layer_norm
    return dropout_add_layer_norm(ffn_output, attention_output, out_norm.weight, out_norm.bias, ffn.dropout.p,
                                  eps=out_norm.eps, training=ffn.dropout.training)


_PART = "_fastcls_fused_part"  # on the embeddings' LayerNorm and dropout, whose fusion the embeddings report


def _set_forward(module, forward, marker, what):
    module.forward = types.MethodType(forward, module)
    module.__dict__[marker] = what


def _fuse(name: str, module: nn.Module) -> str | None:
    """Give `module` a fused forward if it is one of the known blocks; returns what was fused, or None."""
    cls = type(module)
    if _FUSED in module.__dict__ or not cls.__module__.startswith("transformers.models."):
        return None
    if _listed(cls, _OUTPUT_BLOCKS) and _fusable_norm(module.LayerNorm):
        _set_forward(module, _output_block_forward, _FUSED, "dropout + add + LayerNorm")
    elif _listed(cls, _EMBEDDINGS) and _fusable_norm(module.LayerNorm):
        module.LayerNorm.__dict__["_fastcls_dropout"] = module.dropout  # unregistered: not a submodule
        _set_forward(module.LayerNorm, _embedding_norm_forward, _PART, True)
        _set_forward(module.dropout, _identity_forward, _PART, True)
        module.__dict__[_FUSED] = "LayerNorm + dropout"
    elif cls.__module__ == _DISTILBERT and cls.__name__ == "TransformerBlock" \
            and _fusable_norm(module.sa_layer_norm) and _fusable_norm(module.output_layer_norm):
        _set_forward(module, _distilbert_block_forward, _FUSED, "add + LayerNorm, dropout + add + LayerNorm")
    else:
        return None
    return f"{name} ({module.__dict__[_FUSED]} fused)"


def _unfuse(name: str, module: nn.Module) -> str | None:
    """Undo `_fuse` on one module; returns the name `_fuse` returned, or None for a part or an unfused module."""
    what = module.__dict__.pop(_FUSED, None)
    if what is None and not module.__dict__.pop(_PART, False):
        return None
    module.__dict__.pop("forward", None)
    module.__dict__.pop("_fastcls_dropout", None)
    return None if what is None else f"{name} ({what} fused)"


def patch(model: nn.Module) -> list[str]:
    """Patch `model` in place; returns what was patched: the swapped dropouts' names, "<module> (<what> fused)"
    for each fused block, and the attention function switch. Patching twice changes nothing more."""
    patched = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, child_name, Dropout(child.p).train(child.training))
                patched.append(f"{name}.{child_name}" if name else child_name)
    for name, module in list(model.named_modules()):
        fused = _fuse(name, module)
        if fused is not None:
            patched.append(fused)
    # kept on the model, not the config, so that a saved config.json stays the original's
    unpatched = model.__dict__.setdefault("_fastcls_unpatched_attention", [])
    for config in _configs(model):
        family = FAMILIES.get(config.model_type)
        if family is not None and family.attention_interface and config._attn_implementation in ("sdpa", "eager"):
            unpatched.append((config, config._attn_implementation))
            patched.append(f"attention ({config._attn_implementation} -> {ATTENTION})")
            config._attn_implementation = ATTENTION
    return patched


def unpatch(model: nn.Module) -> list[str]:
    """Undo `patch`; returns the names of what was restored."""
    restored = []
    for name, module in list(model.named_modules()):
        unfused = _unfuse(name, module)
        if unfused is not None:
            restored.append(unfused)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is Dropout:
                setattr(module, child_name, nn.Dropout(child.p).train(child.training))
                restored.append(f"{name}.{child_name}" if name else child_name)
    for config, original in model.__dict__.pop("_fastcls_unpatched_attention", []):
        config._attn_implementation = original
        restored.append(f"attention ({ATTENTION} -> {original})")
    return restored
