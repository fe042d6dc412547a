"""Deferred rows: FusedAdamW's C++ step updates only the embedding-table rows that the step's batch touched, and
every other row catches up when it is next read, by replaying the zero-gradient updates of the steps it skipped
(csrc/adamw_deferred_rows.h), to the bits the dense step would have given it.

Why. The row-sparse step (fastcls.optim.row_sparse) still updates every live row (any nonzero moment) each step and
multiplies every dead row by the decay: on MiniLM over 4,000 SST-2 rows, 4,400 live rows of 30,522 on average
against 226 touched by a batch, ~3.4 ms of a ~100 ms step at the memory's speed, and more for larger vocabularies.
A skipped row needs nothing but a record of each step's constants: its gradient was zero, so its update is a
function of its own weight and moments. The replay runs in registers, in the step's arithmetic
(csrc/adamw_update.h): its work is compute, not memory traffic, and a row with zero moments just multiplies.

Contract. Deferral is opt-in (`FusedAdamW(defer_untouched_rows=True)`; fastcls's trainer turns it on): between
steps, a deferred table's weights and moments are up to date only in the rows the last steps touched. They are
brought up to date
- by fastcls's embedding op (`fastcls.ops.embedding.row_accumulated_embedding`) for the rows it is about to read,
  training or evaluating;
- by `FusedAdamW.sync_deferred_rows()`, which the trainer calls before every evaluation, save, user callback and
  at the end of training, and which `FusedAdamW.state_dict()` calls first; and when the optimizer is collected.
A table or moment written by torch since the optimizer last wrote it (its version counter moved:
`model.load_state_dict`, `optimizer.load_state_dict`, an in-place edit) is taken as it is: the skipped steps of its
rows are dropped. A step that cannot defer (the touched rows unknown, amsgrad, a dense step) first brings every
row up to date.
"""
import weakref

import torch

from fastcls.ops import cpp
from fastcls.ops.embedding import DEFERRED_TABLE
from fastcls.optim.adamw_table import Entry


class DeferredTable:
    """One table's deferral: the step count each row is up to date at, and each step's record."""

    def __init__(self, param: torch.Tensor, entry: Entry, dtype_key):
        self.param, self.dtype_key = param, dtype_key
        self.width = param.shape[1]
        step = int(entry.step)
        self.synced = torch.full((param.shape[0],), step, dtype=torch.int32)
        # the records of steps first, first + 1, ...: none is needed before the step every row was last up to date
        self.first = step
        self.history = torch.zeros((64, cpp.ADAMW_HISTORY_WIDTH), dtype=torch.float32)
        self.ids = None  # the touched ids of the step under way (the kernel reads them by address)
        self._adopt(entry)

    def _adopt(self, entry: Entry) -> None:
        """Take entry's tensors as the ones this table's rows are kept in, as they are now."""
        self.tensors = _kept_tensors(entry)
        self.marks = tuple(None if t is None else t._version for t in self.tensors)
        row = entry.row()
        row[1] = 0  # the catch-up reads no gradient
        self.table_row = torch.tensor(row, dtype=torch.int64)

    def holds(self, entry: Entry) -> bool:
        """Whether a step's tensors are the ones this table keeps its rows in (a loaded state replaces them)."""
        return all(a is b for a, b in zip(self.tensors, _kept_tensors(entry)))

    def reconcile(self) -> bool:
        """After torch wrote the tensors since the optimizer did: where only the parameter moved (a model's
        load_state_dict), the rows take the steps they skipped in all but the parameter, as the steps before the
        write gave them, and the deferral goes on (True). Where a moment, master or step count moved it cannot:
        False, the rows taken as they are."""
        versions = tuple(None if t is None else t._version for t in self.tensors)
        if versions == self.marks:
            return True
        if versions[1:] != self.marks[1:]:
            return False
        self._catch_up(None, write_param=False)
        self.written()
        return True

    def written(self) -> None:
        """The optimizer's own write (a step bumps the parameter's version counter): the marks move with it."""
        self.marks = tuple(None if t is None else t._version for t in self.tensors)

    def live_row(self, ids: torch.Tensor | None) -> list[int]:
        """The kernels' live-table row (csrc/adamw.h) for touched `ids` (None: every row)."""
        self.ids = None if ids is None else ids.to(torch.int64).contiguous()  # the kernels read int64
        return [0, self.width, self.synced.data_ptr(), self.history.data_ptr(), self.history.shape[0],
                0 if self.ids is None else self.ids.data_ptr(), 0 if self.ids is None else self.ids.numel(),
                self.first]

    def reserve(self, step: int) -> None:
        """Room in the history for step count `step`."""
        kept = self.history.shape[0]
        if step - self.first >= kept:
            grown = torch.zeros((2 * (step - self.first) + 2, cpp.ADAMW_HISTORY_WIDTH), dtype=torch.float32)
            grown[:kept] = self.history
            self.history = grown

    def catch_up(self, ids: torch.Tensor | None = None) -> bool:
        """Bring rows `ids` (None: every row) up to date; False where this table no longer holds the rows
        (`reconcile`), leaving them as they are."""
        if not self.reconcile():
            return False
        self._catch_up(ids, write_param=True)
        return True

    def _catch_up(self, ids: torch.Tensor | None, write_param: bool) -> None:
        live_row = torch.tensor(self.live_row(ids), dtype=torch.int64)
        ok = cpp.adamw_catch_up_rows(self.dtype_key, self.table_row, live_row, write_param)
        self.ids = None
        if not ok:
            raise IndexError(f"an embedding id lies outside the table's {self.param.shape[0]} rows")
        if ids is None:  # every row up to date: the records so far are needed no more (a long run's stay small)
            step = int(self.tensors[-1])
            self.history = self.history[step - self.first:].clone()
            self.first = step


class DeferredRows:
    """The deferred tables of one FusedAdamW."""

    def __init__(self):
        self._tables: dict[torch.Tensor, DeferredTable] = {}
        # the rows caught up, and the parameters left alone, when the optimizer goes (not at exit: nothing reads
        # them after it)
        weakref.finalize(self, _drop_all, self._tables).atexit = False

    def live_row(self, param: torch.Tensor, entry: Entry, dtype_key, ids: torch.Tensor) -> list[int]:
        """A step's live-table row for param, deferring its untouched rows from now on."""
        table = self._tables.get(param)
        if table is not None and not (table.holds(entry) and table.reconcile()):
            self.drop(param, catch_up=False)  # replaced or written by torch since: taken as it is
            table = None
        if table is None:
            table = self._tables[param] = DeferredTable(param, entry, dtype_key)
            setattr(param, DEFERRED_TABLE, table)
        table.reserve(int(entry.step) + 1)
        return table.live_row(ids)

    def reconcile(self, param: torch.Tensor) -> None:
        """Before the optimizer adopts a parameter's changes into its master (DeferredTable.reconcile)."""
        table = self._tables.get(param)
        if table is not None and not table.reconcile():
            self.drop(param, catch_up=False)

    def written(self, params: list[torch.Tensor]) -> None:
        for param in params:
            table = self._tables.get(param)
            if table is not None:
                table.ids = None
                table.written()

    def drop(self, param: torch.Tensor, catch_up: bool = True) -> None:
        """Stop deferring param's rows, after bringing them up to date (unless catch_up is False)."""
        table = self._tables.pop(param, None)
        if table is not None:
            if catch_up:
                table.catch_up()
            _forget(param, table)

    def sync(self) -> None:
        """Every deferred row up to date (the deferral goes on at the next step)."""
        for table in self._tables.values():
            table.catch_up()

    def clear(self) -> None:
        """Every deferred row up to date, and no table deferred any more."""
        _drop_all(self._tables)


def _drop_all(tables: dict) -> None:
    for param, table in tables.items():
        table.catch_up()
        _forget(param, table)
    tables.clear()


def _forget(param: torch.Tensor, table: DeferredTable) -> None:
    """The embedding op stops catching param's rows up (unless a newer table took its place)."""
    if getattr(param, DEFERRED_TABLE, None) is table:
        delattr(param, DEFERRED_TABLE)


def _kept_tensors(entry: Entry) -> tuple:
    """The tensors a deferred table's rows live in."""
    return entry.param, entry.exp_avg, entry.exp_avg_sq, entry.master, entry.step
