"""A trained classifier for Python callers: texts in, labels by name or probabilities out."""
from collections.abc import Sequence

import numpy as np
import torch

from fastcls.components.precision import resolve_precision
from fastcls.data import Example, LabelMap, tokenize_examples
from fastcls.errors import DataError
from fastcls.evaluate import predict_logits


class Classifier:
    """What `fastcls.load` and `fastcls.train(...).classifier` give: `predict(texts)` labels each text by name,
    `predict_proba(texts)` gives the probability of every label (columns in `labels` order).

    `texts`: a string, a list of strings, or a list of (text, pair) tuples for a model trained on pairs."""

    def __init__(self, model, tokenizer, labels: LabelMap, max_length: int, device: torch.device | None = None,
                 precision: str = "auto"):
        self.model, self.tokenizer, self.label_map, self.max_length = model.eval(), tokenizer, labels, max_length
        self.device = device if device is not None else next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device)  # auto: bf16 where the hardware is fast at it

    @property
    def labels(self) -> list[str]:
        return list(self.label_map.names)

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
            return torch.empty(0, len(self.label_map))
        encoded = tokenize_examples(examples, self.tokenizer, self.max_length)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return predict_logits(self.model, encoded, batch_size, self.device, self.precision, pad_id).cpu()

    def predict_proba(self, texts, batch_size: int = 128) -> np.ndarray:
        """Probabilities [N, K] as a numpy array; column k is `labels[k]`."""
        return torch.softmax(self.logits(texts, batch_size), dim=-1).numpy()

    def predict(self, texts, batch_size: int = 128) -> list[str]:
        """The most probable label of each text, by name."""
        return [self.label_map.names[k] for k in self.logits(texts, batch_size).argmax(-1).tolist()]
