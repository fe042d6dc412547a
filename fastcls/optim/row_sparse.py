"""Row-sparse AdamW steps for embedding tables on the CPU: FusedAdamW's C++ step reads and writes only the rows a
run has touched, to the same bits as the dense step.

MiniLM's word-embedding table is half of its parameters, but a batch touches a few hundred of its 30522 rows, and a
whole run over a small data set a fraction of them. A row whose gradient and moments are zero gets from AdamW exactly
w ← w·(1 − lr·λ): m and v stay 0 and the update is step_size · 0 / (0·k + ε) = 0. So for a 2-D parameter whose
touched rows `fastcls.ops.embedding.touched_rows` tracks (every other row's gradient is zero), the step keeps a mask
of live rows, those with any nonzero bit in exp_avg or exp_avg_sq (−0.0 included) plus each step's touched ids,
runs the full update on them and only the decay multiply on the rest (nothing at all when lr·λ is 0), and the
gradient-norm pass for clipping reads the step's touched rows only (csrc/adamw.h says why that sum has the same bits
too).

The mask is derived from the state when first needed and again whenever exp_avg or exp_avg_sq was replaced or
written by torch since (a loaded state dict, the reference backend, a user's edit; the kernels' own writes move no
version counter): a state saved by the dense step or by torch.optim.AdamW resumes here, and back, with no extra
field. A step that cannot use it (the touched rows unknown, amsgrad, a non-contiguous layout, the switch
`FusedAdamW.row_sparse` off) drops it.

Speed (benchmarks/bench_adamw_rows.py, RESULTS.md): the kernel walks the table's runs of live and of dead rows,
each run one streaming pass, and the threads share the work by bytes moved, not by elements. Scattered live rows
cut the streams short: with more than DENSE_FRACTION of the rows live (scattered at random) the row-sparse step
measured no faster than the dense one, which such a table then takes (its mask kept up to date all the same). A
second pass over live rows after a decay pass over the whole table measured slower than the one pass.
"""
import weakref

import torch

from fastcls.ops.embedding import touched_rows
from fastcls.optim.adamw_table import Entry
from fastcls.optim.deferred_rows import DeferredRows

DENSE_FRACTION = 0.4
_DENSE_ROW = (0, 1, 0, 0, 0, 0, 0, 0)  # a live_table row that leaves its tensor to the dense update


def nonzero_rows(moment: torch.Tensor) -> torch.Tensor:
    """Whether each row of a 2-D fp32 tensor has a bit set (a −0.0 counts: the dense update would rewrite it)."""
    return moment.view(torch.int32).ne(0).any(dim=1)


class LiveRows:
    """The live-row masks of one FusedAdamW's row-sparse parameters."""

    def __init__(self):
        # param -> (mask, the moments it was derived from: weak references and version counters)
        self._masks: dict[torch.Tensor, tuple[torch.Tensor, tuple]] = {}
        self._touched: dict[torch.Tensor, torch.Tensor] = {}  # param -> this step's touched rows (bool, a row each)

    def mask(self, param: torch.Tensor) -> torch.Tensor | None:
        """The parameter's current live-row mask (bool, a row each), None when it has none."""
        return self._masks[param][0] if param in self._masks else None

    def live_tables(self, params: list[torch.Tensor], entries: tuple[Entry, ...], enabled: bool,
                    deferred: DeferredRows | None = None,
                    dtype_key=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The C++ kernels' live table for a bucket's update (csrc/adamw.h), each step's touched ids added to the
        masks, and one for its gradient-norm pass, whose masks hold this step's touched rows alone: every other row's
        gradient is zero, so the sum has the same bits (adamw.h) from a few hundred rows rather than every row a run
        has touched. Each None when no parameter of the bucket is row-sparse there. `enabled`: a C++ step with the
        switch on. `deferred`: where the optimizer defers untouched rows (fastcls.optim.deferred_rows), the
        row-sparse tables' update rows defer theirs (dtype_key: the bucket's kernel key)."""
        rows = [self._row(param, entry, deferred, dtype_key) if enabled else self._drop(param, deferred)
                for param, entry in zip(params, entries)]
        return tuple(torch.tensor(table, dtype=torch.int64) if any(row != _DENSE_ROW for row in table) else None
                     for table in zip(*rows)) if rows else (None, None)

    def _drop(self, param: torch.Tensor, deferred: DeferredRows | None) -> tuple[tuple, tuple]:
        if deferred is not None:
            deferred.drop(param)  # its rows up to date before a step that updates them all
        self._masks.pop(param, None)  # a dense step may make any row live: derive the mask again when next needed
        self._touched.pop(param, None)
        return _DENSE_ROW, _DENSE_ROW

    def _row(self, param: torch.Tensor, entry: Entry, deferred: DeferredRows | None, dtype_key) -> tuple[tuple, tuple]:
        ids = touched_rows(param)
        tensors = (entry.param, entry.grad, entry.exp_avg, entry.exp_avg_sq, entry.master)
        if ids is None or param.dim() != 2 or param.numel() == 0 or entry.max_exp_avg_sq is not None \
                or entry.exp_avg.dtype != torch.float32 \
                or not all(t is None or t.is_contiguous() for t in tensors):
            return self._drop(param, deferred)
        if deferred is not None:
            # no mask to keep: the step touches these rows alone (the mask is derived afresh if deferral stops)
            self._masks.pop(param, None)
            touched = self._touched[param] = torch.zeros(param.shape[0], dtype=torch.bool).index_fill_(0, ids, True)
            return (tuple(deferred.live_row(param, entry, dtype_key, ids)),
                    (touched.data_ptr(), param.shape[1], 0, 0, 0, 0, 0, 0))
        moments = (entry.exp_avg, entry.exp_avg_sq)
        marks = tuple((weakref.ref(m), m._version) for m in moments)
        mask, seen = self._masks.get(param, (None, None))
        if seen is None or any(ref() is not m or version != m._version for (ref, version), m in zip(seen, moments)):
            mask = nonzero_rows(entry.exp_avg) | nonzero_rows(entry.exp_avg_sq)
            self._masks[param] = (mask, marks)
        mask.index_fill_(0, ids, True)
        # kept until the next step replaces it: the kernels read it by address
        touched = self._touched[param] = torch.zeros_like(mask).index_fill_(0, ids, True)
        touched_row = (touched.data_ptr(), param.shape[1], 0, 0, 0, 0, 0, 0)
        if mask.sum() > DENSE_FRACTION * len(mask):
            # the mask is kept up to date all the same: it stays right for the steps to come
            return _DENSE_ROW, touched_row
        return (mask.data_ptr(), param.shape[1], 0, 0, 0, 0, 0, 0), touched_row
