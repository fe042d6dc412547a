"""The encoder's part of a forward: a batch in, the pooled vector [rows, d] out (`pooling`: h_CLS, or the mean of
each row's tokens; `fastcls.models.pooling`). Two implementations:

- `LayerwiseEncoder`, for the families whose layers the table (`fastcls.models.families`) describes: the layers
  run one by one from the modules' own parameters, on either batch layout (`fastcls.data.collate`): padded, or
  unpadded so that every dense layer, LayerNorm and dropout skips the padding. Attention is the one place rows
  must stay apart (`fastcls.models.attention`). With [CLS] pooling only h_CLS feeds the head, so the last layer
  runs its query, output projection, LayerNorms and feed-forward on the [CLS] tokens alone (keys and values still
  cover every token): the same result for about a sixth of that layer's work. A frozen prefix (frozen embeddings and the
  bottom layers) runs without an autograd graph, and its output can be served from a `PrefixCache`. With task
  layers (`use_task_layers`, multi-task `--task-layers K`), the encoder keeps its shared bottom layers and
  `fastcls.models.task_layers.TaskLayers` runs every task's copy of the top K above them.
- `OwnForwardEncoder`, for every other encoder: its own forward on padded batches.

Dropout follows each module's mode (`EncoderClassifier.train` keeps frozen modules in eval mode), so a frozen
layer never drops. The layer code reproduces transformers 5.x BertLayer and its copies (BERT, MiniLM, RoBERTa,
XLM-R, CamemBERT, ELECTRA) and DistilBERT's TransformerBlock; tests compare it with the model's own forward.
"""
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import GELUActivation

from fastcls.components.prefix_cache import PrefixCache
from fastcls.data import Batch, PackedBatch
from fastcls.errors import ConfigError
from fastcls.models import attention as attn
from fastcls.models.families import Family, encoder_layers, family_of
from fastcls.models.pooling import masked_mean, pool
from fastcls.ops.dropout_add_layer_norm import (
    MAX_HIDDEN,
    dropout_add_layer_norm,
    layer_norm_dropout,
)
from fastcls.ops.dropout import recomputed_alike
from fastcls.ops.bias_gelu import bias_gelu, bias_gelu_applies
from fastcls.ops.embedding import row_accumulated_embedding
from fastcls.ops.encoder_layer import LayerSpec, encoder_layer, encoder_layer_applies, layer_params
from fastcls.ops.encoder_stack import encoder_stack, encoder_stack_applies
from fastcls.ops.linear import linear, new_forward_pass
from fastcls.ops.varlen_attention import varlen_attention


def _p(module) -> float:
    return float(getattr(module, "p", 0.0))


class _Layer:
    """The parts of one encoder layer, named alike for both layer kinds."""

    def __init__(self, layer: nn.Module, kind: str):
        self.module = layer
        attention = layer.attention
        if kind == "distilbert":
            self.query, self.key, self.value = attention.q_lin, attention.k_lin, attention.v_lin
            self.attn_out, self.heads = attention.out_lin, attention.n_heads
            self.attn_dropout, self.attn_out_dropout = _p(attention.dropout), 0.0
            self.attn_norm, self.out_norm = layer.sa_layer_norm, layer.output_layer_norm
            self.ffn_in, self.act, self.ffn_out = layer.ffn.lin1, layer.ffn.activation, layer.ffn.lin2
            self.out_dropout = _p(layer.ffn.dropout)
        else:
            self.query, self.key, self.value = attention.self.query, attention.self.key, attention.self.value
            self.heads, self.attn_dropout = attention.self.num_attention_heads, _p(attention.self.dropout)
            self.attn_out, self.attn_norm = attention.output.dense, attention.output.LayerNorm
            self.attn_out_dropout = _p(attention.output.dropout)
            self.ffn_in, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
            self.ffn_out, self.out_norm, self.out_dropout = layer.output.dense, layer.output.LayerNorm, _p(layer.output.dropout)
        # GELU's erf form (BERT's "gelu"): the kernels take the first feed-forward product's bias and activation
        self.exact_gelu = type(self.ffn_in) is nn.Linear and (
            isinstance(self.act, GELUActivation) or (isinstance(self.act, nn.GELU) and self.act.approximate == "none"))
        projections = (self.query, self.key, self.value)
        # modules of another class (an adapter's, a quantised one) run their own forward
        self.stackable = (all(type(m) is nn.Linear for m in projections)
                          and len({m.bias is None for m in projections}) == 1)


def _stacked_linear(modules: tuple[nn.Linear, ...], x: torch.Tensor, kernels: bool) -> torch.Tensor:
    """The Linear modules' outputs side by side from one product. One wide product runs nearer the CPU's matrix
    peak than three narrow ones, and its backward takes one product for the input's gradient instead of three and
    two sums. The kernels pack the weights straight from the modules (fastcls.ops.linear), without a torch.cat."""
    bias = None if modules[0].bias is None else torch.cat([m.bias for m in modules])
    if kernels:
        return linear(x, [m.weight for m in modules], bias)
    return F.linear(x, torch.cat([m.weight for m in modules]), bias)


def _linear(module: nn.Module, x: torch.Tensor, kernels: bool) -> torch.Tensor:
    """module(x); a plain nn.Linear by fastcls's products with the kernels (other classes run their own forward)."""
    if kernels and type(module) is nn.Linear:
        return linear(x, module.weight, module.bias)
    return module(x)


def _projections(part: _Layer, h: torch.Tensor, query_input: torch.Tensor, cls_only: bool,
                 kernels: bool):
    """Queries (of query_input's tokens), keys and values (of h's), each [tokens, heads, head_dim]."""
    if not part.stackable:
        q, k, v = part.query(query_input), part.key(h), part.value(h)
    elif cls_only:
        q = _linear(part.query, query_input, kernels)
        k, v = _stacked_linear((part.key, part.value), h, kernels).chunk(2, -1)
    else:
        q, k, v = _stacked_linear((part.query, part.key, part.value), h, kernels).chunk(3, -1)
    return (t.unflatten(-1, (part.heads, -1)) for t in (q, k, v))


def _add_norm(norm: nn.LayerNorm, x, residual, p: float, training: bool, kernels: bool):
    """LayerNorm(dropout(x) + residual)."""
    if kernels:
        return dropout_add_layer_norm(x, residual, norm.weight, norm.bias, p, eps=norm.eps, training=training)
    return F.layer_norm(F.dropout(x, p, training) + residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# Whether the trainable layers of a training step run as one autograd node where fastcls.ops.encoder_stack applies
# (the same bits as layer by layer, less Python between the kernels); the tests compare both
ENCODER_STACK = True


def _layer_args(part: _Layer) -> tuple:
    """A layer's (linears, norms, dropout probabilities) as fastcls.ops.encoder_layer takes them."""
    linears = (part.query, part.key, part.value, part.attn_out, part.ffn_in, part.ffn_out)
    dropouts = ((part.attn_dropout, part.attn_out_dropout, part.out_dropout) if part.module.training
                else (0.0,) * 3)
    return linears, (part.attn_norm, part.out_norm), dropouts


def _spec(part: _Layer, dropouts: tuple) -> LayerSpec:
    return LayerSpec(part.heads, *dropouts, float(part.attn_norm.eps), float(part.out_norm.eps))


def run_layers(parts: list[_Layer], h: torch.Tensor, batch: Batch, cls_last: bool, kernels: bool) -> torch.Tensor | None:
    """The layers on tokens h [T, d] as one node (fastcls.ops.encoder_stack), with cls_last the last one's [CLS]
    rows alone; None where that does not apply."""
    if not (ENCODER_STACK and kernels and len(parts) > 1 and isinstance(batch, PackedBatch)
            and all(part.exact_gelu for part in parts)):
        return None
    args = [(part, *_layer_args(part)) for part in parts]
    params = [layer_params(linears, norms) for _, linears, norms, _ in args]
    if not encoder_stack_applies(h, [(linears, norms, layer, part.heads, dropouts)
                                     for (part, linears, norms, dropouts), layer in zip(args, params)]):
        return None
    layers = [(layer, _spec(part, dropouts)) for (part, _, _, dropouts), layer in zip(args, params)]
    return encoder_stack(h, batch.cu_seqlens, batch.max_len, layers, batch.cls_index if cls_last else None)


def run_layer(part: _Layer, h: torch.Tensor, batch: Batch, cls_only: bool, kernels: bool) -> torch.Tensor:
    """One encoder layer on tokens h [T, d]; with cls_only, only the [CLS] rows' output [rows, d]."""
    training = part.module.training
    if kernels and part.exact_gelu and isinstance(batch, PackedBatch):
        linears, norms, dropouts = _layer_args(part)
        if encoder_layer_applies(h, linears, norms, part.heads, dropouts):  # the whole layer as one autograd node
            return encoder_layer(h, batch.cu_seqlens, batch.max_len, linears, norms, _spec(part, dropouts),
                                 batch.cls_index if cls_only else None)
    query_input = h.index_select(0, batch.cls_index) if cls_only else h
    q, k, v = _projections(part, h, query_input, cls_only, kernels)
    p = part.attn_dropout if training else 0.0
    if not cls_only and isinstance(batch, PackedBatch) and attn.varlen_applies(q, p):
        # the stacked product's q, k and v are strided views of its output
        context = attn.varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), batch.cu_seqlens,
                                        batch.max_len).flatten(-2)
    elif isinstance(batch, PackedBatch) and attn.packed_kernel_applies(q, kernels):
        # reads the strided views in place; with cls_only each row has one query, its [CLS] token
        cu_seqlens_q = torch.arange(batch.num_rows + 1) if cls_only else batch.cu_seqlens
        context = varlen_attention(q, k, v, cu_seqlens_q, batch.cu_seqlens, batch.max_len, p).flatten(-2)
    else:
        queries = q.view(batch.num_rows, part.heads, 1, -1) if cls_only else batch.to_heads(q)
        out = attn.attention(queries, batch.to_heads(k), batch.to_heads(v), batch.key_mask[:, None, None, :], p,
                             kernels=kernels)
        out = out.transpose(1, 2).flatten(-2)  # [rows, L, H * D]
        context = out[:, 0] if cls_only else batch.from_heads(out)
    h = _add_norm(part.attn_norm, _linear(part.attn_out, context, kernels), query_input, part.attn_out_dropout,
                  training, kernels)
    ffn = _linear(part.ffn_out, _activated_ffn_in(part, h, kernels), kernels)
    return _add_norm(part.out_norm, ffn, h, part.out_dropout, training, kernels)


def _activated_ffn_in(part: _Layer, h: torch.Tensor, kernels: bool) -> torch.Tensor:
    """act(ffn_in(h)). With the kernels, GELU's erf form adds the product's bias in its own pass and computes the
    bias gradient in its backward's (fastcls.ops.bias_gelu): no bias copy, no separate gelu, gelu_backward or sum."""
    if kernels and part.exact_gelu and bias_gelu_applies(h):
        x, bias = linear(h, part.ffn_in.weight), part.ffn_in.bias
        # the bias rounded to the product's dtype, as autocast's linear takes it (bf16 weights train alike)
        return bias_gelu(x, None if bias is None else bias.to(x.dtype))
    return part.act(_linear(part.ffn_in, h, kernels))


class LayerwiseEncoder:
    """Runs a supported encoder on a PaddedBatch or PackedBatch (see the module docstring). `kernels`: dropout,
    LayerNorms and the word-embedding gradient run fastcls's kernels (else PyTorch's ops); `pooling`: cls or mean."""

    takes_packed = True

    def __init__(self, encoder: nn.Module, kernels: bool = True, pooling: str = "cls"):
        family = family_of(encoder)
        if not self.supports(encoder):
            raise ValueError(f"{type(encoder).__name__} is not an encoder fastcls runs layer by layer")
        self.encoder, self.kernels, self.pooling = encoder, kernels, pooling
        self.embeddings = encoder.get_submodule(family.embeddings)
        self.project = getattr(encoder, "embeddings_project", None)  # ELECTRA: embedding size -> hidden size
        self.position_offset = self.embeddings.padding_idx + 1 if family.position_offset else 0
        self.layers = [_Layer(layer, family.layer_kind) for layer in encoder_layers(encoder)]
        self.task_layers = None  # a TaskLayers above the shared layers (multi-task `--task-layers`)
        self.frozen_embeddings, self.frozen_layers, self.checkpointing = False, 0, False
        # the word-embedding gradient added row by row into a buffer kept across steps (fastcls.ops.embedding);
        # torch's own embedding where a CUDA graph or torch.compile must see every gradient
        self.row_accumulated_embedding = True
        self.prefix_cache: PrefixCache | None = None
        self.cache_source: int | None = None  # the `Encoded.key` whose rows the cache holds
        self._prefix_dtype = None  # the dtype the prefix produced, restored when reading the cache
        self.layers_as_modules = False

    @staticmethod
    def supports(encoder: nn.Module) -> bool:
        family: Family | None = family_of(encoder)
        config = encoder.config
        if family is None or family.layer_kind is None:
            return False
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            return False
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            return False
        norms = [m for m in encoder.modules() if isinstance(m, nn.LayerNorm)]
        return all(m.weight is not None and m.bias is not None and len(m.normalized_shape) == 1
                   and m.normalized_shape[0] <= MAX_HIDDEN for m in norms)

    @property
    def frozen_layers(self) -> int:
        return self._frozen_layers

    @frozen_layers.setter
    def frozen_layers(self, count: int) -> None:
        if self.task_layers is not None and count > len(self.layers):
            k, shared = self.task_layers.num_layers, len(self.layers)
            raise ConfigError(f"--freeze-layers {count}: with --task-layers {k} only the bottom {shared} of "
                              f"{shared + k} layers are shared, and task-specific layers cannot be frozen; give "
                              f"--freeze-layers {shared} or less")
        self._frozen_layers = count

    def use_task_layers(self, task_layers) -> None:
        """Run `task_layers` (a `fastcls.models.task_layers.TaskLayers` made by `TaskLayers.from_encoder` from
        this encoder, which keeps the shared layers only) above the shared layers: `pooled` then returns
        the pooled vector per task, [tasks, rows, d]."""
        shared = encoder_layers(self.encoder)
        if len(shared) + task_layers.num_layers != self.encoder.config.num_hidden_layers:
            raise ValueError(f"{type(self.encoder).__name__} still holds {len(shared)} layers: build the task "
                             "layers with TaskLayers.from_encoder, which moves the top layers out of the encoder")
        self.layers = [_Layer(layer, task_layers.kind) for layer in shared]
        self.task_layers = task_layers
        self.frozen_layers = self.frozen_layers  # frozen before: must still lie within the shared layers

    def enable_checkpointing(self) -> None:
        """Recompute each trainable layer's activations in the backward (non-reentrant, frozen layers never),
        task layers included."""
        self.checkpointing = True

    def use_prefix_cache(self, cache: PrefixCache | None, source: int | None) -> None:
        """Serve the frozen prefix's output for the rows of `Encoded` `source` from `cache` once stored."""
        self.prefix_cache, self.cache_source = cache, source

    def embed(self, batch: Batch) -> torch.Tensor:
        emb, training = self.embeddings, self.embeddings.training
        words = emb.word_embeddings
        if self.kernels and self.row_accumulated_embedding and not torch.compiler.is_compiling():
            x = row_accumulated_embedding(batch.input_ids, words.weight, words.padding_idx)
        else:
            x = words(batch.input_ids)
        x = x + emb.position_embeddings(batch.position_ids + self.position_offset)
        token_types = getattr(emb, "token_type_embeddings", None)
        if token_types is not None:
            ids = batch.token_type_ids if batch.token_type_ids is not None else torch.zeros_like(batch.input_ids)
            x = x + token_types(ids)
        norm, p = emb.LayerNorm, _p(emb.dropout)
        if self.kernels:
            x = layer_norm_dropout(x, norm.weight, norm.bias, p, eps=norm.eps, training=training)
        else:
            x = F.dropout(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps), p, training)
        return x if self.project is None else self.project(x)

    def call_layers_as_modules(self) -> None:
        """Run each layer through its module's call, so that hooks on the layer fire: FSDP2's gather and free the
        layer's sharded weights around it."""
        for index, part in enumerate(self.layers):
            part.module.forward = functools.partial(self._layer, index)
        self.layers_as_modules = True

    def layer(self, index: int, h: torch.Tensor, batch: Batch, cls_only: bool = False) -> torch.Tensor:
        """Layer `index` on tokens h [T, d]; with cls_only, returns only the [CLS] rows' output [rows, d]."""
        if self.layers_as_modules:
            return self.layers[index].module(h, batch, cls_only)
        return self._layer(index, h, batch, cls_only)

    def _layer(self, index: int, h: torch.Tensor, batch: Batch, cls_only: bool = False) -> torch.Tensor:
        return run_layer(self.layers[index], h, batch, cls_only, self.kernels)

    def _prefix(self, batch: Batch) -> torch.Tensor:
        """The frozen prefix's output [T, d]: from the cache where it holds these rows, else computed (and stored
        there). Without frozen embeddings the frozen layers still need a graph: the embeddings' gradient flows
        through them."""
        cache = self.prefix_cache if isinstance(batch, PackedBatch) and batch.source == self.cache_source else None
        if cache is not None and cache.filled(batch.rows):
            return cache.get(batch.rows).to(self._prefix_dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_embeddings):
            h = self.embed(batch)
            for index in range(self.frozen_layers):
                h = self.layer(index, h, batch)
        if cache is not None and self.frozen_embeddings:
            cache.put(batch.rows, h)
            self._prefix_dtype = h.dtype
            # rounded as the cache serves it later: the layers above see a row's same values every epoch
            h = h.to(cache.dtype).to(h.dtype)
        return h

    def fill_prefix_cache(self, batch: Batch) -> None:
        """Run the frozen prefix on `batch` for its rows to be stored in the cache (a resumed run's refill)."""
        self._prefix(batch)

    def pooled(self, batch: Batch) -> torch.Tensor:
        """The pooled vector [rows, d]; with task layers, per task [tasks, rows, d]."""
        n = len(self.layers)
        new_forward_pass()  # fastcls's products pack the weights as they are now (not as a stale buffer held them)
        h = self._prefix(batch)
        checkpointing = self.checkpointing and torch.is_grad_enabled()
        last_cls_only = self.pooling == "cls" and self.task_layers is None
        stacked = None
        if not checkpointing and not self.layers_as_modules and self.task_layers is None:
            stacked = run_layers(self.layers[self.frozen_layers:], h, batch, last_cls_only, self.kernels)
        # else layer by layer
        for index in range(self.frozen_layers, n) if stacked is None else ():
            cls_only = last_cls_only and index == n - 1
            if checkpointing:
                h = checkpoint(recomputed_alike(self.layer), index, h, batch, cls_only, use_reentrant=False,
                               context_fn=attn.recompute_in_the_same_context)
            else:
                h = self.layer(index, h, batch, cls_only)
        h = h if stacked is None else stacked
        if self.task_layers is not None:
            return self.task_layers(h, batch, kernels=self.kernels, checkpointing=checkpointing, pooling=self.pooling)
        if last_cls_only and self.frozen_layers < n:
            return h  # the last layer ran on the [CLS] tokens alone
        return pool(h, batch, self.pooling)


def _checkpointed(forward):
    """forward under non-reentrant checkpointing, each call's recomputation redrawing that call's dropout masks."""
    def call(*args, **kwargs):
        return checkpoint(recomputed_alike(forward), *args, use_reentrant=False,
                          context_fn=attn.recompute_in_the_same_context, **kwargs)
    return call


class OwnForwardEncoder:
    """Any other encoder: its own forward on padded batches. It takes input_ids and attention_mask (and
    token_type_ids where its forward names them) and returns an output with `last_hidden_state`, a tuple whose
    first item is the hidden states, or the hidden states [rows, L, d] themselves. `pooling`: cls or mean."""

    takes_packed = False

    def __init__(self, encoder: nn.Module, pooling: str = "cls"):
        self.encoder, self.pooling = encoder, pooling
        # BERT's tokenizer emits token types that a DistilBERT or RoBERTa encoder built on it may not take
        self.takes_token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters
        self.frozen_embeddings, self.frozen_layers, self.checkpointing = False, 0, False

    def use_task_layers(self, task_layers) -> None:
        raise task_layers_unsupported(self.encoder)

    def enable_checkpointing(self) -> None:
        """Non-reentrant checkpointing of every trainable layer: gradients reach them even when their input,
        coming from a frozen prefix, needs none."""
        self.checkpointing = True
        for layer in encoder_layers(self.encoder)[self.frozen_layers:]:
            layer.forward = _checkpointed(layer.forward)

    def pooled(self, batch: Batch) -> torch.Tensor:
        if isinstance(batch, PackedBatch):
            raise ValueError(f"{type(self.encoder).__name__} runs through its own forward: it takes padded batches only")
        inputs = batch.padded_inputs()
        if not self.takes_token_types:
            inputs.pop("token_type_ids", None)
        out = self.encoder(**inputs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0] if isinstance(out, tuple | list) else out
        return hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, batch.key_mask)


def task_layers_unsupported(encoder: nn.Module) -> ConfigError:
    return ConfigError(f"--task-layers: {type(encoder).__name__} runs through its own forward, and only the encoders "
                       "fastcls runs layer by layer (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT and their "
                       "checkpoints) can have task-specific layers")


def encoder_body(encoder: nn.Module, kernels: bool, pooling: str = "cls") -> LayerwiseEncoder | OwnForwardEncoder:
    if LayerwiseEncoder.supports(encoder):
        return LayerwiseEncoder(encoder, kernels, pooling)
    return OwnForwardEncoder(encoder, pooling)
