"""A word-embedding lookup whose weight gradient is added row by row into one buffer that lives across steps.

torch's embedding backward returns a dense [V, d] gradient: every step a fresh, zero-filled allocation of the
whole table (47 MB for MiniLM's 30522 x 384) into which the batch's few hundred rows are added. On the CPU,
with batches of varying size, the allocator rarely finds that block free again, so the fill also faults its
pages in: 7 ms of a 140 ms MiniLM step. Here the table's gradient buffer is allocated once: the backward adds
the batch's rows into it in place, and when the training loop has reset `.grad` to None (zero_grad's
set_to_none) it zeroes only the rows the previous step touched before making the buffer `.grad` again.

`.grad` holds the same dense values as with torch's op (rows of repeated ids summed in another order). The
gradient bypasses autograd's accumulation: the op returns none for the weight and writes `.grad` itself, so
`torch.autograd.grad` and gradient hooks on the weight do not see it. It is made for fastcls's training loop,
which reads `.grad`.
"""
import torch
import torch.nn.functional as F

# On the weight: [its gradient buffer, the ids added since the buffer was last zeroed (None: too many, zero it all)]
_BUFFER = "_fastcls_row_grad"
# On the weight, while FusedAdamW defers its untouched rows: the table that catches them up
# (fastcls.optim.deferred_rows)
DEFERRED_TABLE = "_fastcls_deferred"


class _RowAccumulatedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        ids = ids.reshape(-1)
        rows = grad_out.reshape(-1, weight.shape[1]).to(weight.dtype)
        if ctx.padding_idx is not None:  # torch gives the padding row no gradient
            rows = rows.masked_fill((ids == ctx.padding_idx)[:, None], 0.0)
        entry = getattr(weight, _BUFFER, None)
        if weight.grad is None:
            if entry is None:
                entry = [torch.zeros_like(weight, memory_format=torch.contiguous_format), ids]
                setattr(weight, _BUFFER, entry)
            else:
                if entry[1] is None:
                    entry[0].zero_()
                else:
                    entry[0].index_fill_(0, entry[1], 0.0)
                entry[1] = ids
            weight.grad = entry[0]
        elif entry is not None and weight.grad is entry[0] and entry[1] is not None:
            # accumulation without set_to_none would grow the list every step: past the table's size, zero it all
            entry[1] = torch.cat([entry[1], ids]) if len(entry[1]) + len(ids) <= weight.shape[0] else None
        # else: a .grad set elsewhere (e.g. zero_grad without set_to_none after another op): add into it
        weight.grad.index_add_(0, ids, rows)
        return None, None, None


def row_accumulated_embedding(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None):
    """F.embedding(ids, weight, padding_idx), with the weight's gradient written into `weight.grad` as above; the
    rows it reads brought up to date first where an optimizer defers them (fastcls.optim.deferred_rows)."""
    deferred = getattr(weight, DEFERRED_TABLE, None)
    if deferred is not None:
        deferred.catch_up(ids.reshape(-1))
    if not weight.requires_grad or not torch.is_grad_enabled():
        return F.embedding(ids, weight, padding_idx)
    return _RowAccumulatedEmbedding.apply(ids, weight, padding_idx)


def touched_rows(weight: torch.Tensor) -> torch.Tensor | None:
    """The ids whose rows `weight.grad` may hold since it was last zeroed (repeats possible), or None when that is
    not tracked (the whole table may be nonzero)."""
    entry = getattr(weight, _BUFFER, None)
    if entry is None or weight.grad is not entry[0]:
        return None
    return entry[1]


def set_touched_rows(weight: torch.Tensor, ids: torch.Tensor | None) -> None:
    """Record that `weight.grad` now holds nonzero rows at `ids` (None: anywhere), for the next zeroing."""
    entry = getattr(weight, _BUFFER, None)
    if entry is not None and weight.grad is entry[0]:
        entry[1] = ids
