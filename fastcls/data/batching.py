"""Tokenise once and group rows of similar length into batches (`fastcls.data.collate` lays a batch out)."""
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch

from fastcls.data.errors import DataError
from fastcls.data.labels import LabelMap
from fastcls.data.reader import Example

UNLABELLED = -1
_ENCODED_KEYS = itertools.count()


@dataclass
class Encoded:
    """Every row's token ids, concatenated: row ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]``.

    One flat int32 array instead of a list of per-row arrays: DataLoader workers share it without
    copy-on-write churn from reference counts, and collate gathers a whole batch in one indexing step.
    """

    input_ids: np.ndarray  # int32, all rows concatenated
    lengths: np.ndarray  # int64 tokens per row, special tokens included
    token_type_ids: np.ndarray | None  # int32 aligned with input_ids; None when the model takes none
    # int64 class ids, UNLABELLED (-1) where an example has no label; or, for several tasks, [rows, tasks] with
    # the ignored label -100 (fastcls.data.collate.IGNORED_LABEL) where a row has no label for a task
    labels: np.ndarray
    num_truncated: int  # rows cut to max_length
    max_length: int
    offsets: np.ndarray = field(init=False)
    has_labels: bool = field(init=False)
    # tells the rows of one tokenisation from another's: the frozen-prefix cache serves only the rows it stored
    key: int = field(init=False)

    def __post_init__(self) -> None:
        self.key = next(_ENCODED_KEYS)
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)))
        # a task's missing labels are ignored by the loss, so a label matrix is labels throughout
        self.has_labels = bool(len(self.labels)) and (self.labels.ndim == 2 or bool((self.labels != UNLABELLED).all()))

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> np.ndarray:
        return self.input_ids[self.offsets[i] : self.offsets[i + 1]]


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int, *, label_map: LabelMap | None = None,
    label_ids: np.ndarray | None = None,
) -> Encoded:
    """Tokenise all examples in one batched call of a Hugging Face fast tokenizer, truncating to `max_length`.

    Labels become ids through `label_map`, or are the given `label_ids` (one row per example: the [rows, tasks]
    matrix of several tasks); with neither (prediction) every label is UNLABELLED.
    """
    if not examples:
        raise DataError("no examples to tokenize")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; load one with use_fast=True")
    width = len(examples[0].texts)
    mixed = next((e for e in examples if len(e.texts) != width), None)
    if mixed is not None:
        raise DataError(f"{mixed.where}: has {len(mixed.texts)} texts where earlier examples have {width}")
    pair = width == 2
    minimum = tokenizer.num_special_tokens_to_add(pair) + 1
    if max_length < minimum:
        raise DataError(
            f"--max-length {max_length} is too small: the tokenizer adds {minimum - 1} special tokens to each "
            f"{'text pair' if pair else 'text'}, so it must be at least {minimum}"
        )
    with_token_types = "token_type_ids" in tokenizer.model_input_names
    batch = tokenizer(
        [e.texts[0] for e in examples],
        [e.texts[1] for e in examples] if pair else None,
        truncation=True,
        max_length=max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=with_token_types,
    )
    # the Rust encoder keeps what truncation cut off in `overflowing`, so counting needs no second pass
    num_truncated = sum(1 for encoding in batch.encodings if encoding.overflowing)
    lengths = np.fromiter(map(len, batch["input_ids"]), dtype=np.int64, count=len(examples))
    total = int(lengths.sum())
    token_type_ids = (
        np.fromiter(chain.from_iterable(batch["token_type_ids"]), dtype=np.int32, count=total)
        if with_token_types
        else None
    )
    if label_ids is not None:
        if label_map is not None:
            raise ValueError("give label_map or label_ids, not both")
        if len(label_ids) != len(examples):
            raise ValueError(f"{len(label_ids)} rows of label ids for {len(examples)} examples")
        labels = np.asarray(label_ids, dtype=np.int64)
    elif label_map is None:
        labels = np.full(len(examples), UNLABELLED, dtype=np.int64)
    else:
        labels = np.fromiter(
            (UNLABELLED if e.label is None else label_map.encode(e.label, where=e.where) for e in examples),
            dtype=np.int64,
            count=len(examples),
        )
    return Encoded(
        input_ids=np.fromiter(chain.from_iterable(batch["input_ids"]), dtype=np.int32, count=total),
        lengths=lengths,
        token_type_ids=token_type_ids,
        labels=labels,
        num_truncated=num_truncated,
        max_length=max_length,
    )


def check_batch_sizes(batch_size: int, group_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1, got {group_size}")


class LengthGroupedBatches:
    """Batches of row indices (lists of ints), usable as a DataLoader ``batch_sampler``.

    ``shuffle=True`` (training), every epoch: shuffle all rows, cut them into mega-batches of
    ``batch_size * group_size`` rows, sort each mega-batch by length (longest first), cut it into batches and
    shuffle the order of the batches. Rows in a batch then have similar lengths, so little padding, while
    batch contents and order still change every epoch (Hugging Face's ``group_by_length`` does the same).
    The last batch may be smaller; no row is dropped.

    ``shuffle=False`` (evaluation): all rows sorted by length, longest first; ``restore_order`` puts the
    outputs back in dataset order.

    Each ``iter()`` yields the batches of the current epoch and then advances it, so a plain
    ``for epoch in ...: for batch in loader`` reshuffles; ``set_epoch`` resumes at a given epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        group_size: int = 50,
        seed: int = 0,
    ):
        check_batch_sizes(batch_size, group_size)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if not len(self.lengths):
            raise ValueError("no rows to batch")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`: the same for the same seed and epoch."""
        if not self.shuffle:
            return self._cut(_longest_first(np.arange(len(self.lengths)), self.lengths))
        # seeded from the pair, not seed + epoch, so seed 1 epoch 0 does not replay seed 0 epoch 1
        rng = np.random.default_rng([self.seed, epoch])
        rows = rng.permutation(len(self.lengths))
        mega = self.batch_size * self.group_size
        batches = []
        for start in range(0, len(rows), mega):
            batches += self._cut(_longest_first(rows[start : start + mega], self.lengths))
        return [batches[i] for i in rng.permutation(len(batches))]

    def _cut(self, rows: np.ndarray) -> list[list[int]]:
        return [rows[i : i + self.batch_size].tolist() for i in range(0, len(rows), self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)


def _longest_first(rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    # stable, so rows of equal length keep their shuffled order
    return rows[np.argsort(-lengths[rows], kind="stable")]


def restore_order(values: Any, batches: Iterable[Sequence[int]]) -> Any:
    """Per-row outputs collected batch by batch (a tensor, array or list), put back in dataset order."""
    order = np.fromiter(chain.from_iterable(batches), dtype=np.int64)
    if len(values) != len(order):
        raise ValueError(f"{len(values)} values for {len(order)} rows in the batches")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    if isinstance(values, torch.Tensor):
        return values[torch.from_numpy(position).to(values.device)]
    if isinstance(values, np.ndarray):
        return values[position]
    return [values[i] for i in position]


def padding_efficiency(encoded: Encoded, batches: Iterable[Sequence[int]]) -> float:
    """Real tokens / all tokens fed to the model when each batch is padded to its longest row."""
    real = padded = 0
    for batch in batches:
        lengths = encoded.lengths[np.asarray(batch, dtype=np.int64)]
        real += int(lengths.sum())
        padded += len(lengths) * int(lengths.max())
    return real / padded if padded else 1.0


