"""A trained classifier for Python callers: texts in, labels by name or probabilities out."""
from collections.abc import Sequence

import torch

from fastcls.components.precision import resolve_precision
from fastcls.data import Example, LabelMap, TaskLabels, tokenize_examples
from fastcls.errors import DataError
from fastcls.evaluate import predict_logits


class Classifier:
    """What `fastcls.load` and `fastcls.train(...).classifier` give: `predict(texts)` labels each text by name,
    `predict_proba(texts)` gives the probability of every label (columns in `labels` order).

    `texts`: a string, a list of strings, or a list of (text, pair) tuples for a model trained on pairs.

    A multi-task model answers for every task at once, as a dict by task name, or for the one named by `task`."""

    def __init__(self, model, tokenizer, labels: LabelMap | TaskLabels, max_length: int,
                 device: torch.device | None = None, precision: str = "auto"):
        self.model, self.tokenizer, self.label_map, self.max_length = model.eval(), tokenizer, labels, max_length
        self.device = device if device is not None else next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device)  # auto: bf16 where the hardware is fast at it

    @property
    def labels(self) -> list[str] | dict[str, list[str]]:
        """The label names in column order; a multi-task model's per task."""
        if isinstance(self.label_map, TaskLabels):
            return {name: list(m.names) for name, m in zip(self.label_map.names, self.label_map.maps, strict=True)}
        return list(self.label_map.names)

    @property
    def tasks(self) -> list[str] | None:
        return list(self.label_map.names) if isinstance(self.label_map, TaskLabels) else None

    def _per_task(self, logits: torch.Tensor, task: str | None, answer):
        if not isinstance(self.label_map, TaskLabels):
            if task is not None:
                raise ValueError(f"task={task!r}: this model has a single task")
            return answer(logits, self.label_map)
        answers = {name: answer(self.label_map.task_logits(logits, t), self.label_map.maps[t])
                   for t, name in enumerate(self.label_map.names) if task in (None, name)}
        if task is not None and not answers:
            raise ValueError(f"task={task!r}: the tasks are {self.label_map.names}")
        return answers if task is None else answers[task]

    def logits(self, texts: str | Sequence[str] | Sequence[tuple[str, str]], batch_size: int = 128) -> torch.Tensor:
        """fp32 logits [N, K] on the CPU, one row per text, in order."""
        if isinstance(texts, str):
            texts = [texts]
        examples = []
        for i, text in enumerate(texts):
            parts = (text,) if isinstance(text, str) else tuple(text)
            if not parts or any(not isinstance(part, str) or not part.strip() for part in parts):
                raise DataError(f"<texts> row {i}: expected a non-empty string or a (text, pair) tuple, got {text!r}")
            examples.append(Example(parts, None, i, "<texts>"))
        if not examples:
            return torch.empty(0, self.model.num_labels)
        encoded = tokenize_examples(examples, self.tokenizer, self.max_length)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return predict_logits(self.model, encoded, batch_size, self.device, self.precision, pad_id).cpu()

    def predict_proba(self, texts, batch_size: int = 128, task: str | None = None):
        """Probabilities [N, K] as a numpy array; column k is `labels[k]` (multi-task: a dict of them by task, or
        `task`'s)."""
        return self._per_task(self.logits(texts, batch_size), task,
                              lambda logits, _: torch.softmax(logits, dim=-1).numpy())

    def predict(self, texts, batch_size: int = 128, task: str | None = None):
        """The most probable label of each text, by name (multi-task: a dict of lists by task, or `task`'s)."""
        return self._per_task(self.logits(texts, batch_size), task,
                              lambda logits, label_map: [label_map.names[k] for k in logits.argmax(-1).tolist()])
