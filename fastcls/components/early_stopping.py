"""Which evaluation is the best so far, and when patience has run out."""
from dataclasses import dataclass


@dataclass
class EarlyStopping:
    metric: str  # accuracy | macro_f1 | loss (the record's "dev_loss")
    patience: int | None = None  # evaluations without gain before stopping; None = never
    task: str | None = None  # a multi-task run's task whose metric decides (else the mean over the tasks)
    best: dict | None = None  # the best evaluation's record
    evals_without_gain: int = 0

    def improved(self, record: dict) -> bool:
        """Whether `record` beats the best so far (and becomes it)."""
        key = f"{self.task}/{self.metric}" if self.task else "dev_loss" if self.metric == "loss" else self.metric
        value = record[key]
        if self.best is None or (value < self.best[key] if self.metric == "loss" else value > self.best[key]):
            self.best, self.evals_without_gain = record, 0
            return True
        self.evals_without_gain += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_gain >= self.patience
