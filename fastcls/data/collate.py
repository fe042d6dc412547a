"""A batch of rows laid out for the encoder: padded to its longest row, or unpadded (rows concatenated).

Both layouts carry the same fields, so the layer-by-layer encoder runs one code path over either: tokens are a
flat `[T]` sequence (`T = rows * max_len` padded, the real tokens alone unpadded), `cls_index` picks each row's
first token, and `key_mask` [rows, max_len] marks the real positions of the padded grid that attention works
in. `to_heads` / `from_heads` move per-token tensors into that grid and back: a view for a padded batch, a
scatter and gather for an unpadded one.

Everything is built on the host and `max_len` is a Python int, so no kernel launch waits for a value read back
from the device; `to(device)` queues the copies from pinned memory.

A CUDA graph replays fixed shapes: `collate(..., shape=(rows, length))` pads a batch to one of a few
(`bucket_length`), with filler rows that attend to their first token only and carry the ignored label -100, so
they change neither the loss nor any gradient.
"""
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastcls.data.batching import Encoded


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64, 0 at each row's first token
    token_type_ids: torch.Tensor | None  # [T] int64
    cls_index: torch.Tensor  # [rows] int64: each row's first token
    key_mask: torch.Tensor  # [rows, max_len] bool
    labels: torch.Tensor | None  # [rows] int64, or [rows, tasks] with -100 where a row has no label for a task
    max_len: int
    rows: np.ndarray  # the rows' indices in `Encoded` (host side: the frozen-prefix cache looks them up)
    source: int  # `Encoded.key` of the data the rows come from
    # multi-task training under torchrun (fastcls.models.head.MultiTaskHead): each task's labelled rows in the
    # whole global batch [T], and this rank's share of that batch's rows
    label_counts: torch.Tensor | None = None
    row_share: float = 1.0

    @property
    def num_rows(self) -> int:
        return len(self.cls_index)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def to(self, device: torch.device):
        """This batch with its tensors on `device`, copied from pinned memory without waiting for the GPU."""
        if device.type != "cuda":
            return self

        def move(value):
            return value.pin_memory().to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

        return dataclasses.replace(self, **{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclass
class PaddedBatch(_Batch):
    """Rows right-padded to `max_len`; token t is position t % max_len of row t // max_len."""

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.key_mask.long()

    def padded_inputs(self) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask (and token_type_ids) as [rows, max_len], for an encoder's own forward."""
        shape = (self.num_rows, self.max_len)
        inputs = {"input_ids": self.input_ids.view(shape), "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids.view(shape)
        return inputs

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H, D] -> [rows, H, max_len, D]."""
        return x.view(self.num_rows, self.max_len, *x.shape[1:]).transpose(1, 2)

    def from_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, max_len, H * D] -> [T, H * D]."""
        return x.reshape(self.num_tokens, x.shape[-1])


@dataclass
class PackedBatch(_Batch):
    """Rows concatenated without padding: rows are `cu_seqlens[r]:cu_seqlens[r + 1]`, and `pad_index` places
    each token in the [rows * max_len] padded grid."""

    cu_seqlens: torch.Tensor = None  # [rows + 1] int32
    pad_index: torch.Tensor = None  # [T] int64

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H, D] -> [rows, H, max_len, D], zeros at the padding."""
        padded = x.new_zeros(self.num_rows * self.max_len, *x.shape[1:]).index_copy(0, self.pad_index, x)
        return padded.view(self.num_rows, self.max_len, *x.shape[1:]).transpose(1, 2)

    def from_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, max_len, H * D] -> [T, H * D], the real tokens only."""
        return x.reshape(self.num_rows * self.max_len, x.shape[-1]).index_select(0, self.pad_index)


Batch = PaddedBatch | PackedBatch


IGNORED_LABEL = -100  # the cross-entropy's ignore_index: filler rows add nothing to the loss


def bucket_length(length: int, max_length: int) -> int:
    """`length` rounded up to a multiple of 8 (to 64), 16 (to 128), 32 (to 256) or 64, at most `max_length`: a
    dozen or two shapes for any length distribution, each adding under an eighth to a third of padding."""
    quantum = 8 if length <= 64 else 16 if length <= 128 else 32 if length <= 256 else 64
    return max(length, min(max_length, -(-length // quantum) * quantum))


def _gather(encoded: Encoded, indices: Sequence[int]):
    rows = np.asarray(indices, dtype=np.int64)
    if not len(rows):
        raise ValueError("cannot collate an empty batch")
    return rows, encoded.lengths[rows]


def collate(encoded: Encoded, indices: Sequence[int], *, packed: bool, pad_token_id: int = 0,
            labels: bool = True, shape: tuple[int, int] | None = None) -> Batch:
    """The rows at `indices`, in that order, unpadded (`packed`) or padded with `pad_token_id`. Labels come
    along when `labels` is set and every row of `encoded` has one. `shape` (padded only): pad to that many rows
    (filler rows, see the module docstring) of that length."""
    rows, lengths = _gather(encoded, indices)
    max_len = int(lengths.max())
    row_labels = encoded.labels[rows] if labels and encoded.has_labels else None
    if shape is not None:
        if packed or shape[0] < len(rows) or shape[1] < max_len:
            raise ValueError(f"cannot pad {len(rows)} rows of up to {max_len} tokens to the padded shape {shape}")
        filler = shape[0] - len(rows)
        lengths = np.concatenate([lengths, np.ones(filler, dtype=lengths.dtype)])
        if row_labels is not None:
            filler_labels = np.full((filler, *row_labels.shape[1:]), IGNORED_LABEL, dtype=row_labels.dtype)
            row_labels = np.concatenate([row_labels, filler_labels])
        max_len = shape[1]
    real = np.arange(max_len) < lengths[:, None]
    common = dict(key_mask=torch.from_numpy(real), max_len=max_len, rows=rows, source=encoded.key,
                  labels=None if row_labels is None else torch.from_numpy(row_labels))
    if packed:
        cu_seqlens = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu_seqlens[1:])
        row_of_token = np.repeat(np.arange(len(rows)), lengths)
        position = np.arange(cu_seqlens[-1]) - cu_seqlens[:-1][row_of_token]
        source = encoded.offsets[rows][row_of_token] + position
        token_types = None if encoded.token_type_ids is None else encoded.token_type_ids[source].astype(np.int64)
        return PackedBatch(
            input_ids=torch.from_numpy(encoded.input_ids[source].astype(np.int64)),
            position_ids=torch.from_numpy(position),
            token_type_ids=None if token_types is None else torch.from_numpy(token_types),
            cls_index=torch.from_numpy(cu_seqlens[:-1].copy()),
            cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
            pad_index=torch.from_numpy(row_of_token * max_len + position), **common)
    if pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)")
    # boolean-mask assignment fills row by row, the same order in which `real` picks the source positions; filler
    # rows keep the pad token in their one attended position
    n_rows = len(lengths)
    real_rows = real[:len(rows)]
    source = (encoded.offsets[rows][:, None] + np.arange(max_len))[real_rows]
    input_ids = np.full((n_rows, max_len), pad_token_id, dtype=np.int64)
    input_ids[:len(rows)][real_rows] = encoded.input_ids[source]
    token_types = None
    if encoded.token_type_ids is not None:
        token_types = np.zeros((n_rows, max_len), dtype=np.int64)
        token_types[:len(rows)][real_rows] = encoded.token_type_ids[source]
    return PaddedBatch(
        input_ids=torch.from_numpy(input_ids.reshape(-1)),
        position_ids=torch.arange(max_len).repeat(n_rows),
        token_type_ids=None if token_types is None else torch.from_numpy(token_types.reshape(-1)),
        cls_index=torch.arange(n_rows) * max_len, **common)
