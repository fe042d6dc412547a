"""Inference over an encoded data set: logits in the data's row order, metrics, prediction files."""
import csv
import json
from pathlib import Path

import torch

from fastcls.components.distributed import Distributed, rank_order, shard_batches
from fastcls.components.metrics import classification_report
from fastcls.components.precision import autocast
from fastcls.data import Encoded, LabelMap, LengthGroupedBatches, TaskLabels, collate, restore_order
from fastcls.data.collate import IGNORED_LABEL
from fastcls.ops import cross_entropy

# a cell a spreadsheet would run as a formula starts with one of these
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@torch.inference_mode()
def predict_logits(model, encoded: Encoded, batch_size: int, device: torch.device, precision: str, pad_token_id: int,
                   ddp: Distributed = Distributed()):
    """fp32 logits [N, K] in the data's own order, from the model's own forward on its own batch layout; rows
    run sorted by length to keep padding small. Under torchrun each rank runs every world-th batch and every rank
    gets all the logits, the same as one process computes."""
    was_training = model.training
    model.eval()
    batches = LengthGroupedBatches(encoded.lengths, batch_size, shuffle=False).batches(0)
    mine, counts = shard_batches(batches, ddp)
    outputs = [torch.empty(0, model.num_labels, device=device)]
    rounds = -(-len(batches) // ddp.world_size)
    # a rank short of a batch runs one row and drops its output: under FSDP2 every forward gathers the weights
    # with all the ranks, so all of them run the same number of forwards
    for rows in mine + [batches[0][:1]] * (rounds - len(mine)):
        batch = collate(encoded, rows, packed=model.packed, pad_token_id=pad_token_id, labels=False).to(device)
        with autocast(device, precision):
            outputs.append(model(batch)[1].float())
    outputs = outputs[: 1 + len(mine)]
    model.train(was_training)
    return restore_order(ddp.gather_rows(torch.cat(outputs), counts), rank_order(batches, ddp))


def evaluate_logits(logits: torch.Tensor, encoded: Encoded, labels: LabelMap | TaskLabels) -> dict:
    """Accuracy, macro-F1, per-class figures and the mean cross-entropy; for a multi-task run each task's under
    "TASK/accuracy", "TASK/macro_f1", "TASK/loss" and "per_class"[TASK], on the rows labelled for it, and the
    plain keys hold the mean over the tasks evaluated (those with a labelled row)."""
    target = torch.as_tensor(encoded.labels, dtype=torch.long, device=logits.device)
    if isinstance(labels, LabelMap):
        report = classification_report(logits.argmax(-1), target, labels.names)
        report["loss"] = cross_entropy(logits, target).item()
        return report
    report, per_class = {}, {}
    for t, name in enumerate(labels.names):
        kept = target[:, t] != IGNORED_LABEL
        if not bool(kept.any()):
            continue
        task_logits = labels.task_logits(logits, t)[kept]
        task = classification_report(task_logits.argmax(-1), target[kept, t], labels.maps[t].names)
        per_class[name] = task.pop("per_class")
        task["loss"] = cross_entropy(task_logits, target[kept, t]).item()
        report.update({f"{name}/{key}": value for key, value in task.items()})
    if not per_class:
        raise ValueError("no row of the data is labelled for any task")
    for key in ("accuracy", "macro_f1", "loss"):
        report[key] = sum(report[f"{name}/{key}"] for name in per_class) / len(per_class)
    report["per_class"] = per_class
    return report


def _cell(name: str) -> str:
    """A label cell that no spreadsheet runs as a formula; numbers ("-1", "+2") stay as they are."""
    try:
        float(name)
        return name
    except ValueError:
        return "'" + name if name.startswith(_FORMULA_START) else name


def task_probabilities(logits: torch.Tensor, labels: LabelMap | TaskLabels) -> list[tuple[str, LabelMap, torch.Tensor]]:
    """(task name, its labels, probabilities [N, K_t]) per task; one task named "" for a single-task run."""
    if isinstance(labels, LabelMap):
        return [("", labels, torch.softmax(logits.float(), dim=-1).cpu())]
    return [(name, labels.maps[t], torch.softmax(labels.task_logits(logits, t).float(), dim=-1).cpu())
            for t, name in enumerate(labels.names)]


def write_predictions(path: str | Path, logits: torch.Tensor, labels: LabelMap | TaskLabels) -> None:
    """One row per input row: the predicted label and the probability of every label (CSV, TSV or JSONL); for a
    multi-task run every task's, as columns TASK and TASK_prob_LABEL (JSONL: an object per task)."""
    path = Path(path)
    tasks = task_probabilities(logits, labels)
    preds = [probs.argmax(-1).tolist() for _, _, probs in tasks]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".jsonl", ".json"):
        def record(i: int, name: str, label_map: LabelMap, probs: torch.Tensor, pred: list[int]) -> dict:
            return {"label": label_map.names[pred[i]],
                    "probabilities": dict(zip(label_map.names, probs[i].tolist(), strict=True))}

        with open(path, "w") as f:
            for i in range(len(logits)):
                if isinstance(labels, LabelMap):
                    f.write(json.dumps(record(i, *tasks[0], preds[0])) + "\n")
                else:
                    f.write(json.dumps({name: record(i, name, m, probs, pred)
                                        for (name, m, probs), pred in zip(tasks, preds, strict=True)}) + "\n")
        return
    delimiter = "\t" if path.suffix == ".tsv" else ","
    header = []
    for name, label_map, _ in tasks:
        prefix = f"{name}_" if name else ""
        header += [name or "label", *(f"{prefix}prob_{n}" for n in label_map.names)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        for i in range(len(logits)):
            row = []
            for (_, label_map, probs), pred in zip(tasks, preds, strict=True):
                row += [_cell(label_map.names[pred[i]]), *(f"{x:.6g}" for x in probs[i].tolist())]
            writer.writerow(row)
