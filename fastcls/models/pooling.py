"""Pooling (`--pooling`): the vector per row that the head reads from the last layer's hidden states.

- "cls": the first token's ([CLS], <s>) hidden state, as BERT's fine-tuning and transformers' heads read it;
- "mean": the mean over each row's real tokens, [CLS] and [SEP] included and padding excluded, as
  sentence-transformers' Pooling(mean) computes it (all-MiniLM-L6-v2 and other sentence encoders were trained
  with it).

The mean sums in fp32 at least (bf16 hidden states under autocast), then takes the hidden states' dtype, as h_CLS
has. An unpadded batch's tokens are summed per row with index_add, a segment sum that never builds the padded grid.
"""
import torch

from fastcls.data import Batch, PackedBatch


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over each row's positions where `mask` [rows, L] is set, of `hidden` [..., rows, L, d]."""
    x = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    mask = mask.to(torch.bool)
    sums = torch.where(mask[..., None], x, 0).sum(-2)
    return (sums / mask.sum(-1, keepdim=True).to(x.dtype)).to(hidden.dtype)


def mean_pool(h: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The mean over each row's tokens of h [..., T, d] (tokens in the batch's layout): [..., rows, d]."""
    if not isinstance(batch, PackedBatch):
        return masked_mean(h.unflatten(-2, (batch.num_rows, batch.max_len)), batch.key_mask)
    x = h.to(torch.promote_types(h.dtype, torch.float32))
    row_of_token = batch.pad_index // batch.max_len
    sums = x.new_zeros(*x.shape[:-2], batch.num_rows, x.shape[-1]).index_add(x.dim() - 2, row_of_token, x)
    return (sums / batch.key_mask.sum(-1, keepdim=True).to(x.dtype)).to(h.dtype)


def pool(h: torch.Tensor, batch: Batch, pooling: str) -> torch.Tensor:
    """The pooled vector [..., rows, d] of tokens h [..., T, d]."""
    if pooling == "cls":
        return h.index_select(h.dim() - 2, batch.cls_index)
    if pooling == "mean":
        return mean_pool(h, batch)
    raise ValueError(f"pooling must be cls or mean, got {pooling!r}")
