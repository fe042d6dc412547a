"""Classification metrics from predicted and true label ids, and the run's console and JSONL log."""
import json

import torch


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


def format_report(report: dict) -> str:
    """The report as a table; a multi-task report (keys TASK/accuracy) as one table per task, then the mean."""
    tasks = [key[:-len("/accuracy")] for key in report if key.endswith("/accuracy")]
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


class MetricsLogger:
    """What a run shows and records: a progress bar with loss, learning rate and samples/s on the console, and one
    JSONL record per evaluation (step, epoch, train loss, dev metrics, samples/s) in `jsonl_path`."""

    def __init__(self, jsonl_path, total_steps: int, enabled: bool = True):
        from tqdm.auto import tqdm

        self.jsonl_path, self.enabled = jsonl_path, enabled  # under torchrun only rank 0 shows and writes
        self.progress = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, disable=not enabled)

    def step(self) -> None:
        self.progress.update(1)

    def train(self, loss: float, lr: float, samples_per_s: float) -> None:
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.0f}")

    def evaluation(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tasks = [key[:-len("/accuracy")] for key in record if key.endswith("/accuracy")]
        mean = "mean over tasks: " if tasks else ""
        each = "".join(f"; {task} {record[f'{task}/accuracy']:.4f}, {record[f'{task}/macro_f1']:.4f}, "
                       f"{record[f'{task}/loss']:.4f}" for task in tasks)
        self.write(f"step {record['step']}: dev {mean}accuracy {record['accuracy']:.4f}, "
                   f"macro-F1 {record['macro_f1']:.4f}, loss {record['dev_loss']:.4f}{each}")

    def write(self, message: str) -> None:
        if self.enabled:
            self.progress.write(message)

    def close(self) -> None:
        self.progress.close()
