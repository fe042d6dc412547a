"""Classification metrics from predicted and true label ids."""
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
    lines = [f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}", ""]
    width = max(8, *(len(n) for n in report["per_class"]))
    lines.append(f"{'label':<{width}}  precision  recall      f1  support")
    for name, c in report["per_class"].items():
        lines.append(f"{name:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:6.4f}  {c['support']:7d}")
    return "\n".join(lines)
