"""Several classification tasks over one encoder: read their rows, map each task's labels, tokenise once.

Two ways to give tasks (one or the other):

- one file with several label columns (``--label-column sentiment --label-column topic``): the tasks are named
  after the columns; a row may lack a label for some task (an empty cell; a missing key or null in JSON lines) and
  then only the other tasks learn from it; a row with no label at all is a bad row. One sampling source.
- one file per task (``--task NAME=TRAIN[,DEV][:LABEL_COLUMN]``, `TaskSpec`): each read with its own label
  column, its text columns inferred on its own unless given; a file's rows are no rows of the other tasks. One
  sampling source per task; a task without a dev file is not evaluated.

The labels become one int64 matrix [rows, tasks], IGNORED_LABEL (-100) where a row has no label for a task, so the
loss of every task skips the rows it has no label for.
"""
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastcls.data.batching import Encoded, tokenize_examples
from fastcls.data.collate import IGNORED_LABEL
from fastcls.data.errors import DataError
from fastcls.data.labels import LabelMap
from fastcls.data.reader import (
    SUPPORTED_EXTENSIONS,
    Example,
    MultiTaskExample,
    SkippedRows,
    read_examples,
    read_multitask_examples,
)
from fastcls.errors import ConfigError

TASK_FORMAT = "NAME=TRAIN[,DEV][:LABEL_COLUMN]"
TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass
class TaskSpec:
    """A task read from its own files (or rows in memory); `text_columns` / `text_pair_column` override the
    run's for this task's files (a pair task next to single-text ones)."""

    name: str
    train: str | Path | Any
    dev: str | Path | Any | None = None
    label_column: str = "label"
    text_columns: str | Sequence[str] | None = None
    text_pair_column: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TASK_NAME.fullmatch(self.name):
            raise ConfigError(f"--task: task name {self.name!r} must be letters, digits, '_', '-' or '.'")
        if not isinstance(self.label_column, str) or not self.label_column:
            raise ConfigError(f"--task {self.name}: the label column must be a non-empty string, got "
                              f"{self.label_column!r}")


def parse_task(text: str) -> TaskSpec:
    """The task of a ``--task NAME=TRAIN[,DEV][:LABEL_COLUMN]`` value (label column "label" when left out).

    What follows the last ':' is the label column unless it holds a '/' or a ',' or ends in a data file extension
    (.tsv, .csv, .jsonl, .json): then it is part of a path. A path with a ':' of its own thus reads as intended
    once the label column is written out at the end (``x=data:v2/train.tsv:label``); paths cannot hold a ','."""

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"--task {text!r}: {reason}; expected {TASK_FORMAT}")

    name, equals, files = text.partition("=")
    if not equals:
        raise bad("no '='")
    if not TASK_NAME.fullmatch(name):
        raise bad(f"task name {name!r} must be letters, digits, '_', '-' or '.'")
    label_column = "label"
    head, colon, tail = files.rpartition(":")
    if colon and not any(c in tail for c in "/,") and not tail.lower().endswith(SUPPORTED_EXTENSIONS):
        if not tail:
            raise bad("empty label column after ':'")
        files, label_column = head, tail
    paths = files.split(",")
    if len(paths) > 2:
        raise bad("more than one ',' (a path cannot hold a ',')")
    if not all(paths):
        raise bad("empty file path")
    return TaskSpec(name, paths[0], paths[1] if len(paths) == 2 else None, label_column)


def parse_task_weights(values: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """Each task's loss weight α_t from ``--task-weight NAME=ALPHA`` values: the tasks not named share what the
    named ones leave of 1 equally, so by default every task weighs 1 / tasks, and for two tasks ``a=0.3`` gives
    the other 0.7 (``α L_1 + (1 - α) L_2``). Weights named for every task are taken as they are."""
    given = {}
    for value in values:
        name, equals, number = value.partition("=")
        if not equals:
            raise ConfigError(f"--task-weight {value!r}: expected NAME=ALPHA")
        if name not in names:
            raise ConfigError(f"--task-weight {value!r}: no task {name!r} (tasks: {', '.join(names)})")
        if name in given:
            raise ConfigError(f"--task-weight {value!r}: task {name!r} weighted twice")
        try:
            alpha = float(number)
        except ValueError:
            raise ConfigError(f"--task-weight {value!r}: {number!r} is not a number") from None
        if not math.isfinite(alpha) or alpha < 0:
            raise ConfigError(f"--task-weight {value!r}: a weight must be a finite number >= 0")
        given[name] = alpha
    rest = [name for name in names if name not in given]
    left = 1.0 - sum(given.values())
    if rest and left < -1e-9:
        raise ConfigError(f"--task-weight: the weights given sum to {1 - left:g}, leaving nothing for "
                          f"{', '.join(rest)}; give every task's weight")
    weights = {name: given[name] if name in given else max(left, 0.0) / len(rest) for name in names}
    if not any(weights.values()):
        raise ConfigError("--task-weight: every task's weight is 0; at least one must be positive")
    return weights


@dataclass
class TaskData:
    """Every task's rows, tokenised once: `train.labels` / `dev.labels` are [rows, tasks] label ids (-100 where a
    row has no label for a task); `train_source` names each training row's sampling source (its file)."""

    names: list[str]  # the tasks, in label-matrix column order
    labels: list[LabelMap]  # each task's classes, from its training labels
    train: Encoded
    dev: Encoded | None  # None when no task has a dev set
    train_source: np.ndarray  # int64 [rows]: index into source_names
    source_names: list[str]
    train_counts: list[int]  # labelled training rows per task
    dev_counts: list[int]  # labelled dev rows per task (0: the task is not evaluated)
    skipped: dict[str, SkippedRows] = field(default_factory=dict)  # --skip-bad-rows: the reads that dropped rows

    def summary(self) -> str:
        """One line for the log: ``2 tasks: sentiment 2 labels 67349 rows, topic 4 labels 6333 rows``."""
        parts = [f"{name} {len(labels)} labels {count} rows"
                 for name, labels, count in zip(self.names, self.labels, self.train_counts, strict=True)]
        return f"{len(self.names)} tasks: {', '.join(parts)}"


def read_tasks(
    tokenizer: Any,
    max_length: int,
    *,
    tasks: Sequence[TaskSpec] = (),
    train: str | Path | Any | None = None,
    dev: str | Path | Any | None = None,
    label_columns: Sequence[str] = (),
    text_columns: str | Sequence[str] | None = None,
    text_pair_column: str | None = None,
    skip_bad_rows: bool = False,
) -> TaskData:
    """The tasks of one `train` (and `dev`) file with several `label_columns`, or of `tasks` read from their own
    files (see the module docstring). `skip_bad_rows`: drop bad rows, counted in `TaskData.skipped` under "train"
    and "dev", or "NAME train" and "NAME dev" per task."""
    if tasks and (train is not None or dev is not None or label_columns):
        raise ConfigError("--task cannot be combined with --train, --dev or --label-column: give every task with "
                          "--task, or one --train file with a --label-column per task")
    if tasks:
        return _tasks_from_files(list(tasks), tokenizer, max_length, text_columns, text_pair_column, skip_bad_rows)
    if train is None or not label_columns:
        raise ConfigError("no tasks: give --task NAME=TRAIN for each task, or --train and a --label-column per task")
    return _tasks_from_columns(train, dev, list(label_columns), tokenizer, max_length, text_columns,
                               text_pair_column, skip_bad_rows)


def _tasks_from_columns(train, dev, columns: list[str], tokenizer, max_length, text_columns, text_pair_column,
                        skip_bad_rows) -> TaskData:
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise ConfigError(f"--label-column {twice[0]!r} given twice")
    skipped = {}

    def read(data, name):
        dropped = SkippedRows() if skip_bad_rows else None
        rows = read_multitask_examples(data, label_columns=columns, text_columns=text_columns,
                                       text_pair_column=text_pair_column, name=name, skipped=dropped)
        if dropped is not None and dropped.lines:
            skipped[name] = dropped
        return rows

    train_rows = read(train, "train")
    source = train_rows[0].source
    label_maps = [_label_map(name, [row.labels[t] for row in train_rows], f"{source} column {name!r}")
                  for t, name in enumerate(columns)]

    def encode(rows):
        return tokenize_examples(rows, tokenizer, max_length, label_ids=task_labels(rows, label_maps, columns))

    train_set = encode(train_rows)
    dev_set = encode(read(dev, "dev")) if dev is not None else None
    return TaskData(columns, label_maps, train_set, dev_set, np.zeros(len(train_set), dtype=np.int64), [source],
                    _counts(train_set), _counts(dev_set) if dev_set is not None else [0] * len(columns), skipped)


def _tasks_from_files(specs: list[TaskSpec], tokenizer, max_length, text_columns, text_pair_column,
                      skip_bad_rows) -> TaskData:
    names = [spec.name for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"--task: task {twice[0]!r} given twice")
    skipped = {}

    def read(spec: TaskSpec, split: str):
        dropped = SkippedRows() if skip_bad_rows else None
        rows = read_examples(getattr(spec, split), text_columns=spec.text_columns or text_columns,
                             text_pair_column=spec.text_pair_column or text_pair_column,
                             label_column=spec.label_column, name=f"{spec.name} {split}", skipped=dropped)
        if dropped is not None and dropped.lines:
            skipped[f"{spec.name} {split}"] = dropped
        return rows

    def encode(rows, task: int):
        return tokenize_examples(rows, tokenizer, max_length, label_ids=task_labels(rows, label_maps, names, task))

    label_maps, train_parts, dev_parts, source_names, dev_counts = [], [], [], [], []
    for task, spec in enumerate(specs):
        train_rows = read(spec, "train")
        source_names.append(train_rows[0].source)
        label_maps.append(_label_map(spec.name, [row.label for row in train_rows], train_rows[0].source))
        train_parts.append(encode(train_rows, task))
        if spec.dev is not None:
            dev_parts.append(encode(read(spec, "dev"), task))
        dev_counts.append(len(dev_parts[-1]) if spec.dev is not None else 0)
    train_source = np.repeat(np.arange(len(specs), dtype=np.int64), [len(part) for part in train_parts])
    return TaskData(names, label_maps, _concatenate(train_parts), _concatenate(dev_parts) if dev_parts else None,
                    train_source, source_names, [len(part) for part in train_parts], dev_counts, skipped)


def task_labels(rows: Sequence[MultiTaskExample | Example], label_maps: Sequence[LabelMap], names: Sequence[str],
                task: int | None = None) -> np.ndarray:
    """The int64 [rows, tasks] label ids of `rows` (IGNORED_LABEL where a row has no label for a task): rows with
    a label per task (`read_multitask_examples`), or, with `task`, the rows of that task's own file, which are no
    rows of the other tasks. A label that a task's map lacks is an error naming the file, line and task."""

    def encode(label: str | None, t: int, where: str) -> int:
        return IGNORED_LABEL if label is None else label_maps[t].encode(label, where=f"{where}: task {names[t]!r}")

    ids = np.full((len(rows), len(names)), IGNORED_LABEL, dtype=np.int64)
    for i, row in enumerate(rows):
        if task is None:
            ids[i] = [encode(label, t, row.where) for t, label in enumerate(row.labels)]
        else:
            ids[i, task] = encode(row.label, task, row.where)
    return ids


def _label_map(task: str, labels: list[str | None], where: str) -> LabelMap:
    present = [label for label in labels if label is not None]
    if not present:
        raise DataError(f"task {task!r}: no labelled rows in {where}")
    label_map = LabelMap.from_labels(present)
    if len(label_map) < 2:
        raise DataError(f"task {task!r}: {where} has a single label {label_map.names}; classification needs two or "
                        "more")
    return label_map


def _counts(encoded: Encoded) -> list[int]:
    return (encoded.labels != IGNORED_LABEL).sum(axis=0).tolist()


def _concatenate(parts: list[Encoded]) -> Encoded:
    """The rows of `parts` one after another, as one tokenisation (each part tokenised with the same tokenizer)."""
    return Encoded(
        input_ids=np.concatenate([part.input_ids for part in parts]),
        lengths=np.concatenate([part.lengths for part in parts]),
        token_type_ids=(None if parts[0].token_type_ids is None
                        else np.concatenate([part.token_type_ids for part in parts])),
        labels=np.concatenate([part.labels for part in parts]),
        num_truncated=sum(part.num_truncated for part in parts),
        max_length=parts[0].max_length,
    )
