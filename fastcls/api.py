"""The Python API: `fastcls.train` and `fastcls.load`.

    result = fastcls.train(train="train.csv", dev="dev.csv", output="runs/x", max_steps=100)
    clf = fastcls.load(result.output)
    clf.predict(["a gripping film", "dull"])        # labels by name
    clf.predict_proba(["a gripping film"])          # [N, K] probabilities, columns in clf.labels order

Neither changes process-wide state: torch's global RNG is restored after training, the caller's config is
copied, and the allocator tuning that the CLI makes (`fastcls.components.host_memory`) is left to the caller.
"""
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fastcls.components.callbacks import Callback
from fastcls.components.checkpoint import load_run
from fastcls.components.resume import find_run, resumed_config
from fastcls.components.precision import resolve_device
from fastcls.config import TrainConfig
from fastcls.errors import ConfigError
from fastcls.inference import Classifier
from fastcls.trainer import TrainResult
from fastcls.trainer import train as _train_loop


def train(config: TrainConfig | None = None, /, *, encoder: nn.Module | None = None, tokenizer=None,
          optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None,
          scheduler: Callable[[torch.optim.Optimizer, int], object] | None = None,
          callbacks: Sequence[Callback] = (), resume: str | Path | None = None, **settings) -> TrainResult:
    """Fine-tune a classifier and return the kept checkpoint (the best evaluation's) loaded.

    Settings come from `config`, from keyword arguments named as `TrainConfig`'s fields (they override
    `config`'s), or both; `config` itself is not changed. `train` and `dev` take a .tsv/.csv/.jsonl path or
    rows in memory: a list of dicts, a dict of columns, a pandas DataFrame or a datasets.Dataset.

    - `encoder`: your own encoder module (an AutoModel instance, or any module taking input_ids and
      attention_mask whose output has `last_hidden_state`), trained in place; `tokenizer`: a fast tokenizer
      for it (default: loaded from `model`, or from the encoder's own folder).
    - `optimizer`: `f(param_groups) -> torch.optim.Optimizer`, given the decayed and undecayed parameter groups
      (default: fastcls's FusedAdamW with `lr` and `weight_decay`); `scheduler`: `f(optimizer, total_steps)
      -> an LR scheduler` stepped once per optimizer step (default: warmup then `decay`).
    - multi-task: `tasks=["NAME=TRAIN[,DEV][:LABEL_COLUMN]", {"name": ..., "train": rows, "dev": ...}, ...]` (files
      or rows in memory per task), or `label_column=["a", "b"]` for several label columns of `train`; with
      `task_weights`, `task_weighting`, `task_sampling`, `task_layers` and `metric_task` as the CLI's flags. The
      result's classifier then answers per task (`predict(texts, task=None)` gives a dict by task name).
    - `callbacks`: `fastcls.Callback` objects, called at train begin, step end, evaluation, save and train end.
    - `resume`: a run folder (or "latest": the run in `output`, else the newest under fastcls_runs/) to continue
      from its newest resumable checkpoint with the run's own settings; settings given here (or in `config`,
      where they differ from the defaults) may only change what does not change the run's results (`log_every`,
      `save_every`, ...). Python's `random` and numpy's global generator are set to the checkpoint's state.

    SIGINT and SIGTERM (in the main thread) end training after the current step: a resumable checkpoint is
    written, then `fastcls.TrainingInterrupted` is raised, naming it (`.checkpoint`, `.run_dir`).

    The result has `output` (the run folder), `model`, `classifier` (predict / predict_proba), `best` (its dev
    metrics) and the run's figures.
    """
    base = config if config is not None else TrainConfig()
    if not isinstance(base, TrainConfig):
        raise ConfigError(f"config must be a fastcls.TrainConfig, got {type(base).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"fastcls.train: unknown settings {unknown}; known: {sorted(known)}")
    if resume is not None:  # the run's own settings; what `config` and the keywords change is checked
        defaults = TrainConfig()
        settings = {**{name: getattr(base, name) for name in known
                       if not _same(getattr(base, name), getattr(defaults, name))}, **settings}
        base, settings = resumed_config(find_run(resume, settings.get("output")), settings), {}
    return _train_loop(dataclasses.replace(base, **settings), encoder=encoder, tokenizer=tokenizer,
                       optimizer_factory=optimizer, scheduler_factory=scheduler, callbacks=callbacks,
                       resume=resume is not None)


def _same(value, default) -> bool:
    # rows in memory (a DataFrame, say) have no plain equality: they are a setting given
    return value is default or (isinstance(value, str | int | float | list) and value == default)


def load(path: str | Path, *, device: str = "auto", precision: str = "auto",
         encoder: nn.Module | None = None) -> Classifier:
    """The classifier in a run folder written by `fastcls train` (its kept checkpoint). `precision`: auto (bf16
    where the hardware does bf16 matrix products fast), fp32, bf16 or fp16. `encoder`: the module to load the
    weights into, needed only for an encoder without a transformers config."""
    device = resolve_device(device)
    model, tokenizer, labels, meta = load_run(path, device, encoder=encoder, argument="path")
    return Classifier(model, tokenizer, labels, meta["max_length"], device, precision)
