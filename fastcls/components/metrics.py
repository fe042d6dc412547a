"""Classification metrics from predicted and true label ids, and the run's console and JSONL log."""
import json
import logging
import sys

import torch

from fastcls.console import interactive

log = logging.getLogger(__name__)


def classification_report(pred: torch.Tensor, true: torch.Tensor, names: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision, recall, F1 and support."""
    k = len(names)
    pred, true = pred.long().cpu(), true.long().cpu()
    confusion = torch.bincount(true * k + pred, minlength=k * k).reshape(k, k).double()
    tp = confusion.diag()
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
    present = (support > 0) | (predicted > 0)
    return {
        "accuracy": (tp.sum() / max(1, len(true))).item(),
        # like scikit-learn: average over the classes that occur in the truth or the predictions
        "macro_f1": f1[present].mean().item() if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": precision[i].item(),
                "recall": recall[i].item(),
                "f1": f1[i].item(),
                "support": int(support[i].item()),
            }
            for i, name in enumerate(names)
        },
    }


def report_tasks(report: dict) -> list[str]:
    """The tasks of a multi-task report or eval record (its TASK/accuracy keys), in order; [] for one task."""
    return [key[:-len("/accuracy")] for key in report if key.endswith("/accuracy")]


def format_report(report: dict) -> str:
    """The report as a table; a multi-task report (keys TASK/accuracy) as one table per task, then the mean."""
    tasks = report_tasks(report)
    if tasks:
        blocks = [f"task {task}: " + format_report({"accuracy": report[f"{task}/accuracy"],
                                                    "macro_f1": report[f"{task}/macro_f1"],
                                                    "per_class": report["per_class"][task]}) for task in tasks]
        mean = f"mean over {len(tasks)} tasks: accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}"
        return "\n\n".join([*blocks, mean])
    lines = [f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}", ""]
    width = max(8, *(len(n) for n in report["per_class"]))
    lines.append(f"{'label':<{width}}  precision  recall      f1  support")
    for name, c in report["per_class"].items():
        lines.append(f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:6.4f}  {c['support']:7d}")
    return "\n".join(lines)


def peak_memory_mb(device: torch.device) -> float | None:
    """The peak memory so far in MiB: the CUDA allocator's on a GPU, the process's resident set on the CPU (None
    where the platform does not say: Windows)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def format_train(record: dict, total_steps: int) -> str:
    """A train record as the console's plain line (no progress bar):
    `step 40/375 epoch 0.32 loss 0.6012 lr 4.1e-05 188.4 samples/s 5,620 tokens/s 1,881 MB`."""
    memory = f" {record['memory_mb']:,.0f} MB" if record["memory_mb"] is not None else ""
    return (f"step {record['step']}/{total_steps} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
            f"lr {record['lr']:.3g} {record['samples_per_s']:,.1f} samples/s {record['tokens_per_s']:,.0f} "
            f"tokens/s{memory}")


class MetricsLogger:
    """What a run shows and records. The console: on a terminal (or in a notebook) a progress bar with loss,
    learning rate and samples/s; elsewhere (a file, a pipe, a CI log) one plain line per logging step
    (`format_train`); messages and evaluations as lines through the "fastcls" logger. At WARNING (--quiet)
    neither bar nor lines.

    `jsonl_path` (the run's metrics.jsonl) gets one JSON object per line, each with a "kind":
    - "train", at every --log-every step and at the last step, with or without a dev set: `step` (optimizer steps
      done), `epoch` (step / steps per epoch, 4 decimals), `loss` (the mean training loss over every rank's
      micro-batches since the previous train record), `lr` (the first parameter group's learning rate after the
      step), `samples_per_s` and `tokens_per_s` (rows and real tokens, padding excluded, per training second
      since the start: evaluation and checkpoint saving are not counted), `memory_mb` (the peak so far in MiB:
      torch.cuda.max_memory_allocated on CUDA, the process's peak resident set on the CPU; null where unknown),
      `elapsed_s` (training seconds so far);
    - "eval", at each evaluation on the dev set: `step`, `epoch`, `train_loss` (the mean training loss since the
      previous evaluation), `samples_per_s`, `accuracy`, `macro_f1`, `dev_loss`, `per_class` ({label: precision,
      recall, f1, support}) and, for a multi-task run, TASK/accuracy, TASK/macro_f1 and TASK/loss per task (then
      `accuracy`, `macro_f1` and `dev_loss` are the tasks' means and `per_class` is keyed by task).
    A train record comes before the eval record of the same step. Under torchrun only rank 0 shows and writes."""

    def __init__(self, jsonl_path, total_steps: int, device: torch.device, enabled: bool = True):
        from tqdm.auto import tqdm

        self.jsonl_path, self.total_steps, self.device, self.enabled = jsonl_path, total_steps, device, enabled
        self.bar = enabled and log.isEnabledFor(logging.INFO) and interactive(sys.stdout)
        self.progress = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, file=sys.stdout,
                             disable=not self.bar)

    def step(self) -> None:
        self.progress.update(1)

    def train(self, step: int, epoch: float, loss: float, lr: float, samples: int, tokens: int,
              seconds: float) -> dict:
        """The train record of `step` (`samples` and `tokens` in `seconds` of training so far): written, shown,
        and returned (on every rank)."""
        seconds = max(seconds, 1e-9)
        record = {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "lr": float(lr),
                  "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
                  "memory_mb": peak_memory_mb(self.device), "elapsed_s": seconds}
        if not self.enabled:
            return record
        self._append(record)
        if self.bar:
            self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                                      samples_s=f"{record['samples_per_s']:.0f}")
        else:
            log.info(format_train(record, self.total_steps))
        return record

    def evaluation(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(record)
        tasks = report_tasks(record)
        mean = "mean over tasks: " if tasks else ""
        each = "".join(f"; {task} {record[f'{task}/accuracy']:.4f}, {record[f'{task}/macro_f1']:.4f}, "
                       f"{record[f'{task}/loss']:.4f}" for task in tasks)
        self.write(f"step {record['step']}: dev {mean}accuracy {record['accuracy']:.4f}, "
                   f"macro-F1 {record['macro_f1']:.4f}, loss {record['dev_loss']:.4f}{each}")

    def _append(self, record: dict) -> None:
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write(self, message: str) -> None:
        if self.enabled:
            log.info(message)

    def close(self) -> None:
        self.progress.close()
