"""Hooks into the training loop for jobs that embed fastcls: subclass `Callback` and override what you need.

Each hook gets the loop's `TrainState`; setting `state.should_stop = True` ends training after the current step
(the HF Trainer's `control.should_training_stop`, Lightning's `trainer.should_stop`).
"""
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


def _nothing() -> None:
    pass


@dataclass
class TrainState:
    """`model` and `optimizer` are brought up to date whenever read from the state: FusedAdamW may leave untouched
    embedding rows behind between steps (fastcls.optim.deferred_rows); `before_read` does that."""
    _model: torch.nn.Module
    _optimizer: torch.optim.Optimizer
    total_steps: int
    output: Path
    step: int = 0  # optimizer steps done
    epoch: int = 0
    last_loss: float | None = None  # the newest train record's loss: the mean since the logging step before it
    best: dict | None = None  # the best evaluation so far
    should_stop: bool = False
    log: list[dict] = field(default_factory=list)  # every eval record so far
    before_read: Callable[[], None] = field(default=_nothing, repr=False, compare=False)

    @property
    def model(self) -> torch.nn.Module:
        self.before_read()
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        self.before_read()
        return self._optimizer


class Callback:
    def on_train_begin(self, state: TrainState) -> None:
        """Before the first step, with the model, optimizer and step count built."""

    def on_step_end(self, state: TrainState) -> None:
        """After every optimizer step. `state.last_loss` is fresh only at logging steps (reading the loss back from
        the device every step would cost a host sync on CUDA)."""

    def on_log(self, state: TrainState, record: dict) -> None:
        """At every logging step (--log-every, and the last step), before `on_step_end`: `record` is the train
        record written to metrics.jsonl (fastcls.components.metrics.MetricsLogger: step, epoch, loss, lr,
        samples_per_s, tokens_per_s, memory_mb, elapsed_s); `state.last_loss` is its loss."""

    def on_evaluate(self, state: TrainState, metrics: dict) -> None:
        """After each evaluation on the dev set; `metrics` is the eval record written to metrics.jsonl."""

    def on_save(self, state: TrainState, path: Path) -> None:
        """After the checkpoint was written into the run folder `path`."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step, with the best checkpoint loaded into `state.model`."""
