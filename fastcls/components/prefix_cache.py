"""The frozen prefix's output for every training row, computed in the first epoch and reused in later ones.

When the embeddings and the bottom layers are frozen and run without dropout, their output for a row is the
same every epoch: storing it lets later epochs run only the trainable layers. Rows are stored without
padding, laid out like ``Encoded``: one flat ``[total_tokens, hidden]`` store in which row ``i`` holds tokens
``offsets[i]:offsets[i + 1]``. The rows that fit the memory budget live in one preallocated tensor on the
training device; the rest go to a memory-mapped file, split at a row boundary so each row sits in one tier.
"""
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import numpy as np
import torch

# the disk tier keeps raw element bits (numpy has no bfloat16) and views them back as the cache dtype
_BITS = {2: np.int16, 4: np.int32, 8: np.int64}
_BITS_TORCH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class PrefixCache:
    """Per-row hidden states, stored once with `put` and read back any number of times with `get`.

    ``offsets``: int array of ``rows + 1`` non-decreasing token offsets starting at 0 (``Encoded.offsets``).
    ``budget_bytes``: the most the memory tier may take on `device`; rows ``0:memory_rows`` (the longest
    prefix of rows whose tokens fit) stay there, the others are spilled to a file in ``spill_dir`` (a
    temporary directory of the cache's own when None). The file is deleted by `close`, on leaving a ``with``
    block, or when the cache is garbage collected.

    ``hits`` counts rows served by `get`, ``misses`` rows written by `put` (each first-epoch row is one miss).
    """

    def __init__(
        self,
        offsets: np.ndarray | Sequence[int],
        hidden_size: int,
        device: torch.device | str,
        budget_bytes: int,
        spill_dir: str | Path | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        offsets = np.asarray(offsets)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets.dtype.kind not in "iu":
            raise ValueError(
                f"offsets must be a 1-D integer array of rows + 1 entries, got {offsets.dtype} {offsets.shape}"
            )
        offsets = offsets.astype(np.int64)
        if offsets[0] != 0 or (np.diff(offsets) < 0).any():
            raise ValueError("offsets must start at 0 and never decrease")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be at least 1, got {hidden_size}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be at least 0, got {budget_bytes}")
        if not dtype.is_floating_point or dtype.itemsize not in _BITS:
            raise ValueError(f"dtype must be a floating dtype of 2, 4 or 8 bytes, got {dtype}")
        self.offsets = offsets
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_rows = len(offsets) - 1
        self.total_tokens = int(offsets[-1])
        token_bytes = hidden_size * dtype.itemsize
        # the last row boundary at or below the budget: a row is never split between the tiers
        self.memory_rows = int(np.searchsorted(offsets, budget_bytes // token_bytes, side="right")) - 1
        self.memory_tokens = int(offsets[self.memory_rows])
        self._pinned = self.device.type == "cuda"
        self._memory = torch.empty(self.memory_tokens, hidden_size, dtype=dtype, device=self.device)
        # On the CPU both tiers are gathered and scattered through numpy: its fancy indexing moved bf16 rows
        # 2-5x faster than index_copy_/index_select (single thread), and needs no OpenMP team, which stalls
        # when another process holds a core.
        self._memory_bits = None
        if self.device.type == "cpu":
            self._memory_bits = self._memory.view(_BITS_TORCH[dtype.itemsize]).numpy()
        self._tempdir = None
        self._spill_path = None
        self._disk = None
        disk_tokens = self.total_tokens - self.memory_tokens
        if disk_tokens:
            if spill_dir is None:
                self._tempdir = tempfile.TemporaryDirectory(prefix="fastcls-prefix-cache-")
                spill_dir = self._tempdir.name
            handle, name = tempfile.mkstemp(dir=spill_dir, prefix="prefix-cache-", suffix=".bin")
            self._spill_path = Path(name)
            with open(handle, "wb") as f:
                f.truncate(disk_tokens * token_bytes)
            self._disk = np.memmap(
                self._spill_path, dtype=_BITS[dtype.itemsize], mode="r+", shape=(disk_tokens, hidden_size)
            )
        self._filled = np.zeros(self.num_rows, dtype=bool)
        self._closed = False
        self.hits = 0
        self.misses = 0

    @property
    def bytes_in_memory(self) -> int:
        return self.memory_tokens * self.hidden_size * self.dtype.itemsize

    @property
    def bytes_on_disk(self) -> int:
        return (self.total_tokens - self.memory_tokens) * self.hidden_size * self.dtype.itemsize

    @property
    def rows_filled(self) -> int:
        return int(self._filled.sum())

    @property
    def spill_path(self) -> Path | None:
        """The disk tier's file; None when every row fits in memory."""
        return self._spill_path

    def filled(self, rows: Sequence[int] | np.ndarray) -> bool:
        """Whether every row in `rows` has been stored (a host-side lookup: never waits for the device)."""
        return bool(self._filled[self._rows(rows)].all())

    def put(self, rows: Sequence[int] | np.ndarray, packed: torch.Tensor) -> None:
        """Store `packed`, the tokens of `rows` concatenated in that order (``[their total length, hidden]``),
        cast to the cache dtype. A row stored again is overwritten. Only rows bound for the disk tier make a
        CUDA cache wait for the device."""
        rows = self._rows(rows)
        tokens = self._token_index(rows)
        if packed.ndim != 2 or packed.shape[1] != self.hidden_size:
            raise ValueError(f"packed must be [tokens, {self.hidden_size}], got {list(packed.shape)}")
        if packed.shape[0] != len(tokens):
            raise ValueError(f"packed has {packed.shape[0]} tokens but rows {_preview(rows)} have {len(tokens)}")
        packed = packed.detach()
        in_memory = tokens < self.memory_tokens
        on_disk = ~in_memory
        if in_memory.any():
            source = self._select(packed, in_memory)
            if self._memory_bits is None:
                source = source.to(self.device, self.dtype, non_blocking=True)
                self._memory.index_copy_(0, self._index(tokens[in_memory]), source)
            else:
                self._memory_bits[tokens[in_memory]] = self._host_bits(source)
        if on_disk.any():
            self._disk[tokens[on_disk] - self.memory_tokens] = self._host_bits(self._select(packed, on_disk))
        self._filled[rows] = True
        self.misses += len(rows)

    def get(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The stored tokens of `rows`, concatenated in that order: ``[their total length, hidden]`` on the
        cache's device, in its dtype. Every row must have been stored."""
        rows = self._rows(rows)
        missing = np.flatnonzero(~self._filled[rows])
        if len(missing):
            raise ValueError(
                f"row {int(rows[missing[0]])} is not in the prefix cache yet "
                f"({len(missing)} of the {len(rows)} requested rows are missing)"
            )
        tokens = self._token_index(rows)
        in_memory = tokens < self.memory_tokens
        self.hits += len(rows)
        if in_memory.all():
            return self._read_memory(tokens)
        if not in_memory.any():
            return self._read_host(self._disk, tokens - self.memory_tokens)
        on_disk = ~in_memory
        if self._memory_bits is not None:
            out = np.empty((len(tokens), self.hidden_size), dtype=self._memory_bits.dtype)
            out[in_memory] = self._memory_bits[tokens[in_memory]]
            out[on_disk] = self._disk[tokens[on_disk] - self.memory_tokens]
            return torch.from_numpy(out).view(self.dtype)
        out = torch.empty(len(tokens), self.hidden_size, dtype=self.dtype, device=self.device)
        # one index_copy per tier puts each tier's tokens at their places in request order
        out.index_copy_(0, self._index(np.flatnonzero(in_memory)), self._read_memory(tokens[in_memory]))
        from_disk = self._read_host(self._disk, tokens[on_disk] - self.memory_tokens)
        out.index_copy_(0, self._index(np.flatnonzero(on_disk)), from_disk)
        return out

    def close(self) -> None:
        """Free the memory tier and delete the spill file (and the cache's own temporary directory)."""
        if self._closed:
            return
        self._closed = True
        self._memory = self._memory_bits = None
        self._disk = None  # drops the mapping before the file goes
        if self._spill_path is not None:
            self._spill_path.unlink(missing_ok=True)
        if self._tempdir is not None:
            self._tempdir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # a constructor that raised leaves no _closed behind
        if not getattr(self, "_closed", True):
            self.close()

    def _rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        if self._closed:
            raise RuntimeError("the prefix cache is closed")
        rows = np.asarray(rows)
        if rows.size == 0:
            return rows.astype(np.int64).reshape(0)
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise ValueError(f"rows must be a 1-D sequence of integer row indices, got {rows.dtype} {rows.shape}")
        rows = rows.astype(np.int64)
        bad = np.flatnonzero((rows < 0) | (rows >= self.num_rows))
        if len(bad):
            raise IndexError(f"row {int(rows[bad[0]])} is out of range for a prefix cache of {self.num_rows} rows")
        return rows

    def _token_index(self, rows: np.ndarray) -> np.ndarray:
        """For each token of `rows` packed in that order, its position in the flat store."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        packed_starts = np.cumsum(lengths) - lengths
        return np.repeat(starts - packed_starts, lengths) + np.arange(int(lengths.sum()))

    def _index(self, index: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
        """A host-built index on `device` (the cache's by default); from pinned memory on CUDA, so the copy
        is queued without waiting for the device."""
        device = self.device if device is None else device
        index = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        if device.type != "cuda":
            return index
        return index.pin_memory().to(device, non_blocking=True)

    def _read_memory(self, tokens: np.ndarray) -> torch.Tensor:
        if self._memory_bits is None:
            return self._memory.index_select(0, self._index(tokens))
        return self._read_host(self._memory_bits, tokens)

    def _read_host(self, array: np.ndarray, index: np.ndarray) -> torch.Tensor:
        """Rows `index` of a host tier, as a tensor on the cache's device."""
        # gathered straight into (pinned) host memory: the copy to the device then needs no staging buffer
        bits_dtype = _BITS_TORCH[self.dtype.itemsize]
        bits = torch.empty(len(index), self.hidden_size, dtype=bits_dtype, pin_memory=self._pinned)
        # indices are validated already; mode "raise" would gather through a temporary buffer
        np.take(array, index, axis=0, out=bits.numpy(), mode="clip")
        return bits.view(self.dtype).to(self.device, non_blocking=True)

    def _host_bits(self, source: torch.Tensor) -> np.ndarray:
        """`source` in the cache dtype on the host, as the raw bits a host tier holds (waits for the device)."""
        return source.to("cpu", self.dtype).view(_BITS_TORCH[self.dtype.itemsize]).numpy()

    def _select(self, packed: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
        """The tokens of `packed` where `mask` is set (all of `packed`, uncopied, when it is set everywhere)."""
        if mask.all():
            return packed
        return packed.index_select(0, self._index(np.flatnonzero(mask), packed.device))


def _preview(rows: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(map(str, rows[:limit].tolist()))
    return f"[{shown}{', ...' if len(rows) > limit else ''}]"


def prefix_cache_for(model, train_set, device, epochs: int, enabled: bool, budget_gb: float,
                     rows_change: bool = False):
    """(the cache of `model`'s frozen prefix output per row of `train_set`, installed in the model, or None; why
    not, when None). `enabled`: --cache-frozen; `budget_gb`: --cache-budget-gb; `rows_change`: the training rows
    change every epoch (fresh EDA copies), so no row's output may be served again."""
    if not model.frozen_embeddings:
        return None, "nothing to cache: the embeddings train"
    if not enabled:
        return None, "off (--no-cache-frozen)"
    if rows_change:
        return None, "off: --augment-copies fresh changes the rows every epoch"
    if not model.packed:
        return None, ("needs unpadded batches (--unpad off)" if model.body.takes_packed
                      else f"{type(model.encoder).__name__} runs through its own forward")
    if epochs < 2:
        return None, "one epoch: every row is seen once"
    cache = PrefixCache(train_set.offsets, model.head.linear.in_features, device, int(budget_gb * 2**30))
    model.body.use_prefix_cache(cache, train_set.key)
    return cache, None


def frozen_report(model, cache: PrefixCache | None, no_cache_reason: str | None, epoch_seconds: list[float]):
    """What freezing skipped. The cache's saving is measured, not modelled: every later epoch runs only the
    trainable layers, so (first epoch - later epochs' mean) x later epochs is the prefix time it saved."""
    if not model.frozen_embeddings and not model.frozen_layers:
        return None
    counts = [0, 0]
    for p in model.parameters():
        counts[p.requires_grad] += p.numel()
    report = {"frozen_params": counts[0], "trainable_params": counts[1],
              "epoch_seconds": [round(s, 2) for s in epoch_seconds]}
    if cache is None:
        report["cache"] = no_cache_reason
        return report
    later = epoch_seconds[1:]
    saved = (epoch_seconds[0] - sum(later) / len(later)) * len(later) if later else 0.0
    report.update(cache="on", cache_rows=cache.rows_filled, cache_hits=cache.hits,
                  cache_memory_mb=round(cache.bytes_in_memory / 2**20, 1),
                  cache_disk_mb=round(cache.bytes_on_disk / 2**20, 1), cache_seconds_saved=round(saved, 2))
    return report
