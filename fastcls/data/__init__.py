"""The data layer: read examples from files, map labels to ids, tokenise once, batch by length, collate."""
from fastcls.data.batching import (
    UNLABELLED,
    Encoded,
    LengthGroupedBatches,
    PackedBatch,
    collate,
    collate_packed,
    padding_efficiency,
    restore_order,
    tokenize_examples,
)
from fastcls.data.errors import DataError
from fastcls.data.labels import LabelMap
from fastcls.data.reader import Example, read_examples

__all__ = [
    "UNLABELLED",
    "DataError",
    "Encoded",
    "Example",
    "LabelMap",
    "LengthGroupedBatches",
    "PackedBatch",
    "collate",
    "collate_packed",
    "padding_efficiency",
    "read_examples",
    "restore_order",
    "tokenize_examples",
]
