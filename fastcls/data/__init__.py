"""The data layer: read examples from files or memory, map labels to ids, tokenise once, batch by length, collate."""
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
from fastcls.data.reader import Example, SkippedRows, read_examples

__all__ = [
    "UNLABELLED",
    "Batch",
    "DataError",
    "Encoded",
    "Example",
    "LabelMap",
    "LengthGroupedBatches",
    "PackedBatch",
    "PaddedBatch",
    "SkippedRows",
    "TaskLabels",
    "collate",
    "load_labels",
    "padding_efficiency",
    "read_examples",
    "restore_order",
    "tokenize_examples",
]
