"""The address tables FusedAdamW's kernels read: a row of addresses per parameter (TABLE_COLUMNS), one table per
bucket, kept on the device while the rows stay the same; and the buckets a step prepares before it measures the
gradients and updates (see `fastcls.optim.adamw` for the design)."""
from dataclasses import dataclass

import torch

TABLE_COLUMNS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param", "step", "numel")


def is_dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill one gap-free block of memory in some order (contiguous up to a permutation)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


@dataclass(slots=True)
class Entry:
    """One parameter's tensors as a kernel sees them; `staged` holds the originals that staging copies replace."""
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None
    master: torch.Tensor | None
    step: torch.Tensor
    staged: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def row(self) -> list[int]:
        """The entry's table row (TABLE_COLUMNS)."""
        return [self.param.data_ptr(), self.grad.data_ptr(), self.exp_avg.data_ptr(), self.exp_avg_sq.data_ptr(),
                0 if self.max_exp_avg_sq is None else self.max_exp_avg_sq.data_ptr(),
                0 if self.master is None else self.master.data_ptr(), self.step.data_ptr(), self.param.numel()]


def dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """t's strides where it is dense, else the contiguous ones (the layout torch.empty_like(t) gives)."""
    if is_dense(t):
        return t.stride()
    strides, expected = [], 1
    for size in reversed(t.shape):
        strides.append(expected)
        expected *= max(size, 1)
    return tuple(reversed(strides))


class StagingBuffers:
    """The copies that stand in for tensors the kernels cannot address in place, one per (tensor, role), reused
    while the wanted layout stays: a fresh copy every step would move the table's addresses every step, rebuilding
    it (a host-to-device copy) and invalidating a CUDA graph that captured the step."""

    def __init__(self):
        # keyed by the tensor itself: its hash is its id, so a lookup never compares tensor values
        self._buffers: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def get(self, owner: torch.Tensor, role: str, strides: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer of owner's shape and device with `strides` and `dtype`, kept for owner under `role`; its values
        are whatever the last user left."""
        buffers = self._buffers.setdefault(owner, {})
        buffer = buffers.get(role)
        if buffer is None or buffer.shape != owner.shape or buffer.stride() != strides or buffer.dtype != dtype \
                or buffer.device != owner.device:
            buffer = torch.empty_strided(owner.shape, strides, dtype=dtype, device=owner.device)
            buffers[role] = buffer
        return buffer


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # from pinned memory the copy queues behind the device's work instead of waiting for it
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class AddressTable:
    """A bucket's address table on its device (plus, for Triton, the program-to-chunk map, step tickets and a
    slot per program for the gradient norm's partial sums), kept while the rows stay the same. Gradients
    reallocated elsewhere change only the addresses: the chunk map, tickets and slots of the previous table are
    kept when the element counts are the same."""

    def __init__(self, rows: list[list[int]], device: torch.device, block: int | None,
                 previous: "AddressTable | None"):
        self.rows = rows
        self.table = to_device(torch.tensor(rows, dtype=torch.int64), device)
        self.block = block
        self.numels = [r[-1] for r in rows]
        if block is None:
            return
        if previous is not None and previous.block == block and previous.numels == self.numels:
            self.chunk_tensor, self.chunk_index, self.tickets, self.sums = previous.chunk_tensor, \
                previous.chunk_index, previous.tickets, previous.sums
            return
        from fastcls.kernels.adamw import chunk_map

        self.chunk_tensor, self.chunk_index = (to_device(t, device) for t in chunk_map(self.numels, block))
        self.tickets = torch.zeros(len(rows), dtype=torch.int32, device=device)
        self.sums = torch.empty(len(self.chunk_tensor), dtype=torch.float32, device=device)


@dataclass(slots=True)
class Bucket:
    """A bucket ready to step (its key: group index, device, parameter and gradient dtypes, master mode): its
    tensors, the backend that runs it, and for the kernels its address table (and the C++ kernels' row masks)."""
    key: tuple
    params: list[torch.Tensor]
    entries: tuple[Entry, ...]
    backend: str
    dtype_key: object
    lr: float | torch.Tensor
    hyper: dict
    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor | None
    table: AddressTable | None
    live_table: torch.Tensor | None = None  # the C++ kernels' row masks (fastcls.optim.row_sparse)
    grad_live_table: torch.Tensor | None = None  # the gradient-norm pass's: the touched rows alone

    @property
    def device(self) -> torch.device:
        return self.key[1]

    @property
    def master(self) -> bool:
        return self.key[4]
