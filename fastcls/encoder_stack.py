"""A Hugging Face encoder run layer by layer on unpadded tokens, with its frozen prefix split off.

    embeddings -> layers[:frozen] (no autograd graph, no dropout) -> layers[frozen:] (trained) -> h_CLS

Tokens of a batch are concatenated ([T, d], `fastcls.data.PackedBatch`): every dense layer, LayerNorm and
dropout runs on real tokens only. Attention is the one place rows must stay apart: variable-length flash
attention on CUDA where it applies (bf16/fp16, no attention dropout), elsewhere the tokens are scattered into a
padded [B, H, L, D] layout for that one product and gathered back.

Only h_CLS feeds the classifier, so the last layer runs its query, output projection, LayerNorms and
feed-forward on the B [CLS] tokens alone (its keys and values still cover every token): the same result for
about a sixth of that layer's work.

The layer code reproduces transformers 5.x BertLayer (BERT, MiniLM, RoBERTa, XLM-R, CamemBERT, ELECTRA) and
DistilBERT's TransformerBlock with the modules' own parameters; `EncoderStack.supports` says whether an
encoder is one of them. Tests compare it with the model's own forward in fp32, gradients included.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastcls.components.precision import attention_backends
from fastcls.data import PackedBatch
from fastcls.ops import dropout as mask_free_dropout
from fastcls.ops.dropout_add_layer_norm import (
    MAX_HIDDEN,
    dropout_add_layer_norm,
    layer_norm_dropout,
)
from fastcls.ops.embedding import row_accumulated_embedding

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.9
    varlen_attn = None

_BERT_LIKE = {"BertModel", "RobertaModel", "XLMRobertaModel", "CamembertModel", "ElectraModel"}
_ROBERTA_POSITIONS = {"RobertaModel", "XLMRobertaModel", "CamembertModel"}  # positions start at padding_idx + 1


def _dropout_p(module) -> float:
    return float(getattr(module, "p", 0.0))


class _Norm:
    """One LayerNorm's parameters, read from the module each call (the optimizer updates them in place)."""

    def __init__(self, norm: nn.LayerNorm):
        self.module = norm

    def __call__(self, x, residual, p: float, training: bool, fused: bool):
        """LayerNorm(dropout(x) + residual)."""
        norm = self.module
        if fused:
            return dropout_add_layer_norm(x, residual, norm.weight, norm.bias, p, eps=norm.eps, training=training)
        return F.layer_norm(F.dropout(x, p, training) + residual, norm.normalized_shape, norm.weight, norm.bias,
                            norm.eps)


class _Layer:
    """The parts of one encoder layer, named alike for both families."""

    def __init__(self, layer: nn.Module, distilbert: bool):
        if distilbert:
            attention = layer.attention
            self.query, self.key, self.value, self.attn_out = (attention.q_lin, attention.k_lin, attention.v_lin,
                                                               attention.out_lin)
            self.attn_dropout, self.heads = _dropout_p(attention.dropout), attention.n_heads
            self.attn_norm, self.attn_out_dropout = _Norm(layer.sa_layer_norm), 0.0
            ffn = layer.ffn
            self.ffn_in, self.act, self.ffn_out = ffn.lin1, ffn.activation, ffn.lin2
            self.out_norm, self.out_dropout = _Norm(layer.output_layer_norm), _dropout_p(ffn.dropout)
        else:
            attention = layer.attention
            self.query, self.key, self.value = attention.self.query, attention.self.key, attention.self.value
            self.attn_dropout, self.heads = _dropout_p(attention.self.dropout), attention.self.num_attention_heads
            self.attn_out = attention.output.dense
            self.attn_norm, self.attn_out_dropout = _Norm(attention.output.LayerNorm), _dropout_p(attention.output.dropout)
            self.ffn_in, self.act = layer.intermediate.dense, layer.intermediate.intermediate_act_fn
            self.ffn_out = layer.output.dense
            self.out_norm, self.out_dropout = _Norm(layer.output.LayerNorm), _dropout_p(layer.output.dropout)
        self.module = layer


def _to_padded(x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[T, H, D] tokens -> [B, H, L, D], zeros at the padding."""
    padded = x.new_zeros(batch.num_rows * batch.max_len, *x.shape[1:]).index_copy(0, batch.pad_index, x)
    return padded.view(batch.num_rows, batch.max_len, *x.shape[1:]).transpose(1, 2)


def attention(q, k, v, batch: PackedBatch, p: float, fused: bool, cls_only: bool) -> torch.Tensor:
    """Each row's tokens attend to that row's tokens. q, k, v: [T, H, D] ([B, H, D] for q when cls_only,
    the [CLS] queries alone); returns [T, H * D] ([B, H * D])."""
    rows, heads, head_dim = batch.num_rows, k.shape[1], k.shape[2]
    if (not cls_only and p == 0.0 and varlen_attn is not None and q.is_cuda
            and q.dtype in (torch.bfloat16, torch.float16)):
        return varlen_attn(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_len, batch.max_len
                           ).reshape(-1, heads * head_dim)
    keys, values = _to_padded(k, batch), _to_padded(v, batch)
    queries = q.view(rows, heads, 1, head_dim) if cls_only else _to_padded(q, batch)
    mask = batch.key_mask[:, None, None, :]
    if fused and p > 0.0 and not q.is_cuda:
        # on the CPU, SDPA's dropout falls back to its math path with torch's slow bernoulli_ mask
        scores = torch.matmul(queries, keys.transpose(-1, -2)) * head_dim ** -0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        # in the scores' own dtype: torch's CPU softmax accumulates bf16 rows in fp32 anyway, and an fp32 result
        # would only be rounded back to bf16 for the product with the values
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(mask_free_dropout(probs, p, training=True), values)
    else:
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=p)
    out = out.transpose(1, 2).reshape(rows, -1, heads * head_dim)  # [B, L, H * D]
    if cls_only:
        return out[:, 0]
    return out.reshape(rows * batch.max_len, heads * head_dim).index_select(0, batch.pad_index)


def recompute_in_the_same_context():
    """checkpoint's context_fn: the recomputation runs in the backward, outside the training loop's attention
    backend choice, and must pick the same SDPA kernel as the forward did (another saves other tensors, and
    checkpoint refuses the mismatch: seen on an H200)."""
    return attention_backends(), attention_backends()


class EncoderStack:
    """Runs `encoder` (one of the supported families) on a PackedBatch; see the module docstring."""

    def __init__(self, encoder: nn.Module):
        if not self.supports(encoder):
            raise ValueError(f"{type(encoder).__name__} is not an encoder fastcls runs unpadded")
        name = type(encoder).__name__
        distilbert = name == "DistilBertModel"
        self.encoder = encoder
        self.embeddings = encoder.embeddings
        self.project = getattr(encoder, "embeddings_project", None)  # ELECTRA: embedding size -> hidden size
        self.position_offset = encoder.embeddings.padding_idx + 1 if name in _ROBERTA_POSITIONS else 0
        layers = encoder.transformer.layer if distilbert else encoder.encoder.layer
        self.layers = [_Layer(layer, distilbert) for layer in layers]
        self.embed_norm = _Norm(encoder.embeddings.LayerNorm)

    @staticmethod
    def supports(encoder: nn.Module) -> bool:
        name, config = type(encoder).__name__, getattr(encoder, "config", None)
        if config is None or name not in _BERT_LIKE | {"DistilBertModel"}:
            return False
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            return False
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            return False
        norms = [m for m in encoder.modules() if isinstance(m, nn.LayerNorm)]
        return all(m.weight is not None and m.bias is not None and len(m.normalized_shape) == 1
                   and m.normalized_shape[0] <= MAX_HIDDEN for m in norms)

    def embed(self, batch: PackedBatch, training: bool, fused: bool) -> torch.Tensor:
        emb = self.embeddings
        words = emb.word_embeddings
        if fused:
            words = row_accumulated_embedding(batch.input_ids, words.weight, words.padding_idx)
        else:
            words = words(batch.input_ids)
        x = words + emb.position_embeddings(batch.position_ids + self.position_offset)
        token_types = getattr(emb, "token_type_embeddings", None)
        if token_types is not None:
            ids = batch.token_type_ids if batch.token_type_ids is not None else torch.zeros_like(batch.input_ids)
            x = x + token_types(ids)
        p = _dropout_p(emb.dropout) if training else 0.0
        norm = self.embed_norm.module
        if fused:
            x = layer_norm_dropout(x, norm.weight, norm.bias, p, eps=norm.eps, training=training)
        else:
            x = F.dropout(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps), p, training)
        return x if self.project is None else self.project(x)

    def layer(self, index: int, h: torch.Tensor, batch: PackedBatch, training: bool, fused: bool,
              cls_only: bool = False) -> torch.Tensor:
        """Layer `index` on tokens h [T, d]; with cls_only, returns only the [CLS] rows' output [B, d]."""
        part = self.layers[index]
        heads = part.heads
        query_input = h.index_select(0, batch.cls_index) if cls_only else h
        q = part.query(query_input).unflatten(-1, (heads, -1))
        k, v = part.key(h).unflatten(-1, (heads, -1)), part.value(h).unflatten(-1, (heads, -1))
        context = attention(q, k, v, batch, part.attn_dropout if training else 0.0, fused, cls_only)
        p_attn_out, p_out = (part.attn_out_dropout, part.out_dropout) if training else (0.0, 0.0)
        h = part.attn_norm(part.attn_out(context), query_input, p_attn_out, training, fused)
        return part.out_norm(part.ffn_out(part.act(part.ffn_in(h))), h, p_out, training, fused)

    def cls_hidden(self, batch: PackedBatch, *, training: bool, frozen_embeddings: bool = False,
                   frozen_layers: int = 0, checkpointing: bool = False, fused: bool = True,
                   prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h_CLS [B, d], the frozen prefix's output [T, d] or None).

        The frozen prefix (frozen embeddings and the bottom `frozen_layers` layers) runs without dropout, so its
        output for a row never changes: pass it back as `prefix` to skip it. Without frozen embeddings the
        frozen layers still need a graph (the embeddings' gradient flows through them), but no dropout either.
        Trainable layers run with `training` dropout, each checkpointed (non-reentrant) if asked."""
        n = len(self.layers)
        if not 0 <= frozen_layers <= n:
            raise ValueError(f"--freeze-layers {frozen_layers}: the encoder has {n} layers")
        prefix_out = None
        if prefix is None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen_embeddings):
                h = self.embed(batch, training and not frozen_embeddings, fused)
                for index in range(frozen_layers):
                    h = self.layer(index, h, batch, False, fused)
            if frozen_embeddings:
                prefix_out = h
        else:
            h = prefix
        if frozen_layers == n:
            return h.index_select(0, batch.cls_index), prefix_out
        for index in range(frozen_layers, n):
            cls_only = index == n - 1
            if checkpointing and torch.is_grad_enabled():
                h = checkpoint(self.layer, index, h, batch, training, fused, cls_only, use_reentrant=False,
                               context_fn=recompute_in_the_same_context)
            else:
                h = self.layer(index, h, batch, training, fused, cls_only)
        return h, prefix_out
