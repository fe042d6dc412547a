"""Training batches that mix several sampling sources (the tasks' files), so every task's head learns in every step.

Rows per epoch of source s (n_s rows, N = Σ n_s):

- ``proportional``: n_s, every row once;
- ``uniform``: N / S each;
- ``temperature``: N p_s with p_s ∝ n_s^(1/T) (jiant's; T = 1 is proportional, larger T flattens towards uniform).

Uniform and temperature round to whole rows by largest remainder, so an epoch keeps N rows. An oversampled source
(m_s > n_s) gives each of its rows floor(m_s / n_s) or one more times an epoch; an undersampled one walks through
a permutation of its rows over ceil(n_s / m_s) epochs, so all of them come round before any repeats and no epoch
holds a row twice.

Each of the ceil(N / batch_size) batches takes floor(m_s / batches) or one more of source s's rows, so a source
with at least one row per batch is in every batch. Rows of similar length go together: per group of
``group_size`` batches, each source's rows are sorted by length and dealt out in order, so the first batch of a
group holds the longest rows of every source; the order of the batches is then shuffled
(`fastcls.data.batching.LengthGroupedBatches` does the same for one source).
"""
import math
from collections.abc import Iterator, Sequence

import numpy as np

from fastcls.data.batching import LengthGroupedBatches, _longest_first, check_batch_sizes

SAMPLING = ("proportional", "uniform", "temperature")


def rows_per_epoch(sizes: Sequence[int] | np.ndarray, sampling: str = "proportional",
                   temperature: float = 2.0) -> np.ndarray:
    """How many rows each source of `sizes` rows gives an epoch under `sampling` (see the module docstring)."""
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
    if not temperature > 0:
        raise ValueError(f"the sampling temperature must be > 0, got {temperature}")
    sizes = np.asarray(sizes, dtype=np.int64)
    if sampling == "proportional":
        return sizes.copy()
    weights = np.ones(len(sizes)) if sampling == "uniform" else sizes ** (1.0 / temperature)
    share = weights / weights.sum() * sizes.sum()
    counts = np.floor(share).astype(np.int64)
    left = int(sizes.sum() - counts.sum())
    counts[np.argsort(counts - share, kind="stable")[:left]] += 1
    return counts


class TaskMixedBatches:
    """Batches of row indices (lists of ints) mixing the sources in `source` (one int per row, 0..S-1); the same
    interface as `LengthGroupedBatches` (a DataLoader ``batch_sampler``): ``len`` is the batches per epoch,
    ``batches(epoch)`` the same for the same seed and epoch, whatever the global random state. One source gives
    exactly `LengthGroupedBatches`' batches."""

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        source: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        sampling: str = "proportional",
        temperature: float = 2.0,
        group_size: int = 50,
        seed: int = 0,
    ):
        check_batch_sizes(batch_size, group_size)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        source = np.asarray(source, dtype=np.int64)
        if not len(self.lengths) or len(source) != len(self.lengths):
            raise ValueError(f"{len(source)} sources for {len(self.lengths)} rows")
        self.members = [np.flatnonzero(source == s) for s in range(int(source.max()) + 1)]
        if source.min() < 0 or not all(len(rows) for rows in self.members):
            raise ValueError(f"sources must be numbered 0..S-1, each with rows; got sizes "
                             f"{[len(rows) for rows in self.members]} and a least source {source.min()}")
        self.source_sizes = np.array([len(rows) for rows in self.members], dtype=np.int64)
        self.rows_per_epoch = rows_per_epoch(self.source_sizes, sampling, temperature)
        self.batch_size = batch_size
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0
        self._single = (LengthGroupedBatches(self.lengths, batch_size, group_size=group_size, seed=seed)
                        if len(self.members) == 1 else None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def describe(self, names: Sequence[str] | None = None) -> str:
        """Rows per epoch of each source, for the log: ``sst2 67349 rows, 44400 per epoch; ...``."""
        names = names or [f"source {s}" for s in range(len(self.members))]
        return "; ".join(f"{name} {n} rows, {m} per epoch"
                         for name, n, m in zip(names, self.source_sizes, self.rows_per_epoch, strict=True))

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`: the same for the same seed and epoch."""
        if self._single is not None:
            return self._single.batches(epoch)
        num_batches = len(self)
        counts = self._rows_per_batch(num_batches)
        drawn = [self._drawn(s, epoch) for s in range(len(self.members))]
        taken = np.zeros(len(self.members), dtype=np.int64)
        batches = [[] for _ in range(num_batches)]
        for start in range(0, num_batches, self.group_size):
            group = slice(start, min(start + self.group_size, num_batches))
            for s, rows in enumerate(drawn):
                sizes = counts[s, group]
                group_rows = _longest_first(rows[taken[s] : taken[s] + sizes.sum()], self.lengths)
                taken[s] += sizes.sum()
                for b, part in enumerate(np.split(group_rows, np.cumsum(sizes)[:-1]), start=start):
                    batches[b] += part.tolist()
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(num_batches)
        return [batches[i] for i in order]

    def _rows_per_batch(self, num_batches: int) -> np.ndarray:
        """[sources, batches]: floor(m_s / batches) rows of source s in each batch, and one more in m_s mod batches
        of them, taken round-robin across sources so that no batch gets more than its share of the extra rows."""
        counts = np.repeat(self.rows_per_epoch[:, None] // num_batches, num_batches, axis=1)
        extra = 0
        for s, m in enumerate(self.rows_per_epoch):
            more = int(m % num_batches)
            counts[s, (extra + np.arange(more)) % num_batches] += 1
            extra += more
        return counts

    def _drawn(self, s: int, epoch: int) -> np.ndarray:
        """Source s's rows of `epoch`, none twice unless the source is oversampled. An oversampled source gives each
        row floor(m / n) or ceil(m / n) times, from fresh permutations; an undersampled one walks through one
        permutation over ceil(n / m) epochs (the last topped up from its start), so every row comes round in
        those epochs and different epochs see different rows."""
        n, m = int(self.source_sizes[s]), int(self.rows_per_epoch[s])
        if m == 0:  # a temperature below 1 can starve a small source
            return self.members[s][:0]
        if m >= n:
            cycles = [self._permutation(s, epoch, k) for k in range(math.ceil(m / n))]
            return self.members[s][np.concatenate(cycles)[:m]]
        walk, i = divmod(epoch, math.ceil(n / m))
        order = self._permutation(s, walk, 0)
        rows = order[i * m : (i + 1) * m]
        return self.members[s][np.concatenate([rows, order[: m - len(rows)]])]

    def _permutation(self, s: int, epoch_or_walk: int, cycle: int) -> np.ndarray:
        # the trailing tag keeps these streams apart from the batch order's ([seed, epoch, 1])
        return np.random.default_rng([self.seed, s, epoch_or_walk, cycle, 2]).permutation(int(self.source_sizes[s]))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return math.ceil(int(self.rows_per_epoch.sum()) / self.batch_size)
