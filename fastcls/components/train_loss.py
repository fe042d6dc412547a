"""The training loss as the run reports it, read back from the device only at logging steps and evaluations (a
read is a host sync on CUDA): the mean since the previous train record (`state.last_loss`) and the mean since the
previous evaluation (the eval record's `train_loss`).

The step adds each micro-batch's loss into one device scalar (`TrainStep.loss_sum`, this rank's rows). A read sums
it over the ranks, adds the value into both host sums and zeroes it; each mean is its own sum's, whichever reads
came between. A non-finite loss stays in the device sum until the next read, so the reads check every step.
"""
import torch

from fastcls.components.distributed import Distributed


class TrainLoss:
    """`unread`: micro-batches in the device sum; `log_sum`, `log_count`: the loss summed over the ranks, and the
    micro-batches, read since the last train record; `eval_sum`, `eval_count`: since the last evaluation. The
    host state (`state_dict`) goes into resumable checkpoints with the device sum."""

    def __init__(self, loss_sum: torch.Tensor, ddp: Distributed, state: dict | None = None):
        self.loss_sum, self.ddp = loss_sum, ddp
        self.unread, self.log_sum, self.log_count, self.eval_sum, self.eval_count = 0, 0.0, 0, 0.0, 0
        for name, value in (state or {}).items():
            setattr(self, name, value)

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in ("unread", "log_sum", "log_count", "eval_sum", "eval_count")}

    def add(self) -> None:
        """One micro-batch's loss went into the device sum."""
        self.unread += 1

    def _read(self) -> None:
        value = self.ddp.sum(self.loss_sum.clone()).item()  # each rank's sum is weighted by its share of the rows
        self.loss_sum.zero_()
        self.log_sum, self.eval_sum = self.log_sum + value, self.eval_sum + value
        self.log_count, self.eval_count = self.log_count + self.unread, self.eval_count + self.unread
        self.unread = 0

    def since_logged(self) -> float:
        """The mean over every rank's rows since the previous train record; starts the next one."""
        self._read()
        mean = self.log_sum / (max(1, self.log_count) * self.ddp.world_size)
        self.log_sum, self.log_count = 0.0, 0
        return mean

    def since_evaluation(self) -> float:
        """The mean over every rank's rows since the previous evaluation (or the start); starts the next one."""
        self._read()
        mean = self.eval_sum / (max(1, self.eval_count) * self.ddp.world_size)
        self.eval_sum, self.eval_count = 0.0, 0
        return mean
