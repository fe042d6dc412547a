"""The data layer: read examples from files or memory, map labels to ids, tokenise once, batch by length, collate;
several tasks' data (fastcls.data.tasks) and batches that mix them (fastcls.data.task_batches)."""
from fastcls.data.batching import (
    UNLABELLED,
    Encoded,
    LengthGroupedBatches,
    padding_efficiency,
    restore_order,
    tokenize_examples,
)
from fastcls.data.collate import Batch, PackedBatch, PaddedBatch, bucket_length, collate
from fastcls.data.errors import DataError
from fastcls.data.labels import LabelMap, TaskLabels, load_labels
from fastcls.data.reader import Example, MultiTaskExample, SkippedRows, read_examples, read_multitask_examples
from fastcls.data.task_batches import TaskMixedBatches
from fastcls.data.tasks import TaskData, TaskSpec, parse_task, parse_task_weights, read_tasks, task_labels

__all__ = [
    "UNLABELLED",
    "Batch",
    "DataError",
    "Encoded",
    "Example",
    "LabelMap",
    "LengthGroupedBatches",
    "MultiTaskExample",
    "PackedBatch",
    "PaddedBatch",
    "SkippedRows",
    "TaskData",
    "TaskLabels",
    "TaskMixedBatches",
    "TaskSpec",
    "collate",
    "load_labels",
    "padding_efficiency",
    "parse_task",
    "parse_task_weights",
    "read_examples",
    "read_multitask_examples",
    "read_tasks",
    "restore_order",
    "task_labels",
    "tokenize_examples",
]
