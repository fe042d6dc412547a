"""What a run trains and evaluates on: the tokenised training and dev rows, their labels, the batches of an epoch
and each rank's share of a global batch; for one task, or several (multi-task).

Multi-task runs take their tasks from one file with several label columns (`--label-column a --label-column b`)
or from several files (`--task NAME=TRAIN[,DEV][:LABEL_COLUMN]`, one sampling source per file; see
`fastcls.data.tasks`). Every row carries a label per task, -100 where it has none. Batches mix the sources
(`fastcls.data.task_batches`), so every task's head learns in every step, and each task's loss is the mean over
its labelled rows of the whole global batch: the counts go with each rank's batch, so that a run under torchrun
computes what one process computes.
"""
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from fastcls.components.augmentation import Augmentation, FreshEpochBatches, augmentation_for
from fastcls.components.distributed import Distributed
from fastcls.config import TrainConfig, flag
from fastcls.data import LabelMap, LengthGroupedBatches, SkippedRows, TaskLabels, read_examples, tokenize_examples
from fastcls.data.task_batches import TaskMixedBatches
from fastcls.data.tasks import TASK_FORMAT, TaskSpec, parse_task, parse_task_weights, read_tasks
from fastcls.data.collate import IGNORED_LABEL, Batch
from fastcls.errors import ConfigError, DataError
from fastcls.models.classifier import Tasks

log = logging.getLogger(__name__)


def is_multi_task(cfg: TrainConfig) -> bool:
    return bool(cfg.tasks) or isinstance(cfg.label_column, list)


@dataclass
class TrainingData:
    train: object  # fastcls.data.Encoded; labels [N] or, multi-task, [N, T]
    dev: object | None
    labels: LabelMap | TaskLabels
    tasks: Tasks | None = None  # multi-task runs
    source: np.ndarray | None = None  # multi-task: each training row's source file (the sampling unit)
    skipped_rows: dict = dataclasses.field(default_factory=dict)
    label_columns: list[str] | None = None  # multi-task: each task's label column, for `fastcls eval`
    source_names: list[str] | None = None  # multi-task: the sampling sources (task files, or the one --train)
    summary: str = ""  # multi-task: the tasks, their labels and rows
    augmentation: Augmentation | None = None  # --augment eda: the training rows' copies

    def train_for(self, epoch: int, last: bool = False):
        """The rows epoch `epoch` trains on: `train`, except with fresh EDA copies, which change every epoch (the
        next epoch's are drawn meanwhile, unless this is the `last`)."""
        return self.train if self.augmentation is None else self.augmentation.train_for(epoch, draw_next=not last)

    def batches(self, cfg: TrainConfig, world_size: int) -> LengthGroupedBatches | TaskMixedBatches:
        """Every rank cuts the same global batches (fastcls.components.distributed) and runs its share of each; a
        multi-task run's mix its task files (one file: the same batches as LengthGroupedBatches')."""
        size = cfg.batch_size * world_size
        if self.augmentation is not None and self.augmentation.fresh:
            return FreshEpochBatches(self.augmentation, size, cfg.group_size, cfg.seed)
        if self.source is None:
            return LengthGroupedBatches(self.train.lengths, size, group_size=cfg.group_size, seed=cfg.seed)
        return TaskMixedBatches(self.train.lengths, self.source, size, sampling=cfg.task_sampling,
                                temperature=cfg.sampling_temperature, group_size=cfg.group_size, seed=cfg.seed)

    def share(self, global_rows: list[int], ddp: Distributed) -> tuple[list[int], float, dict]:
        """This rank's rows of a global batch, the weight of its loss and, multi-task, what its batch carries."""
        rows, weight = ddp.share(global_rows)
        if self.tasks is None:
            return rows, weight, {}
        # the head divides each task's summed loss by the global batch's count: DDP's mean over ranks then needs
        # each rank's loss times the world size
        counts = (self.train.labels[global_rows] != IGNORED_LABEL).sum(0)
        share = len(rows) / len(global_rows) if weight else 0.0
        return rows, float(ddp.world_size) if weight else 0.0, {"label_counts": torch.from_numpy(counts),
                                                                 "row_share": share}

    @staticmethod
    def with_counts(batch: Batch, extra: dict) -> Batch:
        return dataclasses.replace(batch, **extra) if extra else batch

    def describe(self, batches) -> str:
        """The data's part of the run's first line."""
        if self.tasks is None:
            copies = f" ({len(self.augmentation.rows)} and their EDA copies)" if self.augmentation else ""
            return f"{len(self.train)} training rows{copies}, {len(self.labels)} labels"
        mixing = f" (per epoch: {batches.describe(self.source_names)})" if len(self.source_names) > 1 else ""
        return f"{len(self.train)} training rows, {self.summary}{mixing}"


def _read(data, cfg: TrainConfig, name: str, skipped_rows: dict):
    """The examples of `data`; with --skip-bad-rows, the rows dropped are logged and counted in `skipped_rows`."""
    skipped = SkippedRows() if cfg.skip_bad_rows else None
    rows = read_examples(data, text_columns=cfg.text_columns, text_pair_column=cfg.text_pair_column,
                         label_column=cfg.label_column, name=name, skipped=skipped)
    if skipped is not None and skipped.lines:
        log.warning(skipped.summary())
        skipped_rows[name] = skipped.counts
    return rows


def read_training_data(cfg: TrainConfig, tokenizer) -> TrainingData:
    """The run's data, tokenised; errors name the file, line and flag at fault."""
    if is_multi_task(cfg):
        return _read_tasks(cfg, tokenizer)
    for name, value in (("task_layers", cfg.task_layers), ("task_weights", cfg.task_weights),
                        ("metric_task", cfg.metric_task)):
        if value:
            raise ConfigError(f"{flag(name)} is for multi-task runs: give several --task or --label-column")
    skipped_rows = {}
    train_rows = _read(cfg.train, cfg, "train", skipped_rows)
    labels = LabelMap.from_labels([row.label for row in train_rows]).renamed(cfg.label_names)
    if len(labels) < 2:
        raise DataError(f"--train: {cfg.train} has a single label {labels.names}; classification needs two or more")
    augmentation = augmentation_for(cfg, train_rows, tokenizer, labels)
    if augmentation is None:
        train_set = tokenize_examples(train_rows, tokenizer, cfg.max_length, label_map=labels)
    else:
        train_set = augmentation.train_for(0)
    dev_set = None
    if cfg.dev is not None:
        dev_rows = _read(cfg.dev, cfg, "dev", skipped_rows)
        dev_set = tokenize_examples(dev_rows, tokenizer, cfg.max_length, label_map=labels)
    return TrainingData(train_set, dev_set, labels, skipped_rows=skipped_rows, augmentation=augmentation)


def task_specs(cfg: TrainConfig) -> list[TaskSpec]:
    """--task values (strings, or tables from a config file or the Python API) as TaskSpecs."""
    specs = []
    for value in cfg.tasks or []:
        if isinstance(value, str):
            specs.append(parse_task(value))
        elif isinstance(value, dict):
            keys = {f.name for f in dataclasses.fields(TaskSpec)}
            if set(value) - keys or not {"name", "train"} <= set(value):
                raise ConfigError(f"--task: a task table needs 'name' and 'train' and may have "
                                  f"{sorted(keys - {'name', 'train'})}, got keys {sorted(value)}")
            specs.append(TaskSpec(**value))
        else:
            raise ConfigError(f"--task: each task is a {TASK_FORMAT} string or a table, got {type(value).__name__}")
    return specs


def _read_tasks(cfg: TrainConfig, tokenizer) -> TrainingData:
    if cfg.augment != "none":
        raise ConfigError("--augment: EDA augments single-task runs only; write augmented files with "
                          "`fastcls augment` and give them as the tasks' files")
    if cfg.label_names is not None:
        raise ConfigError("--label-names renames the labels of a single task; a multi-task run keeps each task's "
                          "labels as its data spells them")
    specs = task_specs(cfg)
    columns = cfg.label_column if isinstance(cfg.label_column, list) else []
    data = read_tasks(tokenizer, cfg.max_length, tasks=specs, train=cfg.train, dev=cfg.dev, label_columns=columns,
                      text_columns=cfg.text_columns, text_pair_column=cfg.text_pair_column,
                      skip_bad_rows=cfg.skip_bad_rows)
    skipped_rows = {}
    for name, skipped in data.skipped.items():
        if skipped.lines:
            log.warning(skipped.summary())
            skipped_rows[name] = skipped.counts
    labels = TaskLabels(data.names, data.labels)
    weights = None
    if cfg.task_weights is not None:
        if cfg.task_weighting == "uncertainty":
            raise ConfigError("--task-weight: --task-weighting uncertainty learns the weights; give one or the other")
        given = cfg.task_weights
        given = [f"{name}={alpha}" for name, alpha in given.items()] if isinstance(given, dict) else given
        weights = [parse_task_weights(given, labels.names)[name] for name in labels.names]
    if cfg.patience is not None and data.dev is None:
        raise ConfigError("--patience needs a dev set: give a task's DEV file (--task NAME=TRAIN,DEV) or --dev")
    if cfg.metric_task is not None and cfg.metric_task not in labels.names:
        raise ConfigError(f"--metric-task {cfg.metric_task}: the tasks are {', '.join(labels.names)}")
    if cfg.metric_task is not None and not data.dev_counts[labels.names.index(cfg.metric_task)]:
        raise ConfigError(f"--metric-task {cfg.metric_task}: that task has no dev rows to choose on")
    tasks = Tasks(labels.names, labels.num_labels, weights, cfg.task_weighting == "uncertainty", cfg.task_layers)
    sources = data.source_names if columns else [spec.name for spec in specs]  # a task's file: the task's name
    return TrainingData(data.train, data.dev, labels, tasks, data.train_source, skipped_rows,
                        columns or [spec.label_column for spec in specs], sources, data.summary())
