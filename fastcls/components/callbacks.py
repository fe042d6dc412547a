"""Hooks into the training loop for jobs that embed fastcls: subclass `Callback` and override what you need.

Each hook gets the loop's `TrainState`; setting `state.should_stop = True` ends training after the current step
(the HF Trainer's `control.should_training_stop`, Lightning's `trainer.should_stop`).
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    total_steps: int
    output: Path
    step: int = 0  # optimizer steps done
    epoch: int = 0
    last_loss: float | None = None  # mean training loss since the last logging step
    best: dict | None = None  # the best evaluation so far
    should_stop: bool = False
    log: list[dict] = field(default_factory=list)  # every evaluation record so far


class Callback:
    def on_train_begin(self, state: TrainState) -> None:
        """Before the first step, with the model, optimizer and step count built."""

    def on_step_end(self, state: TrainState) -> None:
        """After every optimizer step. `state.last_loss` is fresh only at logging steps (reading the loss back from
        the device every step would cost a host sync on CUDA)."""

    def on_log(self, state: TrainState, record: dict) -> None:
        """After each train record (every --log-every steps and the last step); `record` is the record written to
        metrics.jsonl."""

    def on_evaluate(self, state: TrainState, metrics: dict) -> None:
        """After each evaluation on the dev set; `metrics` is the record written to metrics.jsonl."""

    def on_save(self, state: TrainState, path: Path) -> None:
        """After the checkpoint was written into the run folder `path`."""

    def on_train_end(self, state: TrainState) -> None:
        """After the last step, with the best checkpoint loaded into `state.model`."""
