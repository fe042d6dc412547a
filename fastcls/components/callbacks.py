"""Hooks into the training loop for jobs that embed fastcls: subclass `Callback` and override what you need.

Each hook gets the loop's `TrainState`; setting `state.should_stop = True` ends training after the current step
(the HF Trainer's `control.should_training_stop`, Lightning's `trainer.should_stop`).
"""
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from pathlib import Path

import torch


def _nothing() -> None:
    pass


@dataclass
class TrainState:
    """The loop's state as callbacks see it. `model` and `optimizer` are brought up to date whenever read from the
    state: FusedAdamW may leave untouched embedding rows behind between steps (fastcls.optim.deferred_rows), and
    `before_read` catches them up."""
    model: InitVar[torch.nn.Module]
    optimizer: InitVar[torch.optim.Optimizer]
    total_steps: int
    output: Path
    step: int = 0  # optimizer steps done
    epoch: int = 0
    last_loss: float | None = None  # the newest train record's loss: the mean since the logging step before it
    best: dict | None = None  # the best evaluation so far
    should_stop: bool = False
    log: list[dict] = field(default_factory=list)  # every eval record so far
    before_read: Callable[[], None] = field(default=_nothing, repr=False, compare=False)

    def __post_init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._model, self._optimizer = model, optimizer


def _read(name: str) -> property:
    def read(state: TrainState):
        state.before_read()
        return getattr(state, name)
    return property(read)


# set after the class is made: a property in its body would become the init arguments' default
TrainState.model = _read("_model")
TrainState.optimizer = _read("_optimizer")


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
