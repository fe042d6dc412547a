"""Inference over an encoded data set: logits in the data's row order, metrics, prediction files."""
import csv
import json
from pathlib import Path

import torch

from fastcls.components.distributed import Distributed, rank_order, shard_batches
from fastcls.components.metrics import classification_report
from fastcls.components.precision import autocast
from fastcls.data import Encoded, LabelMap, LengthGroupedBatches, collate, restore_order
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


def evaluate_logits(logits: torch.Tensor, encoded: Encoded, labels: LabelMap) -> dict:
    target = torch.as_tensor(encoded.labels, dtype=torch.long, device=logits.device)
    report = classification_report(logits.argmax(-1), target, labels.names)
    report["loss"] = cross_entropy(logits, target).item()
    return report


def _cell(name: str) -> str:
    """A label cell that no spreadsheet runs as a formula; numbers ("-1", "+2") stay as they are."""
    try:
        float(name)
        return name
    except ValueError:
        return "'" + name if name.startswith(_FORMULA_START) else name


def write_predictions(path: str | Path, logits: torch.Tensor, labels: LabelMap) -> None:
    """One row per input row: the predicted label and the probability of every label (CSV, TSV or JSONL)."""
    path = Path(path)
    probs = torch.softmax(logits.float(), dim=-1).cpu()
    pred = probs.argmax(-1).tolist()
    names = labels.names
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".jsonl", ".json"):
        with open(path, "w") as f:
            f.writelines(json.dumps({"label": names[row], "probabilities": dict(zip(names, p, strict=True))}) + "\n"
                         for row, p in zip(pred, probs.tolist(), strict=True))
        return
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["label", *(f"prob_{n}" for n in names)])
        for row, p in zip(pred, probs.tolist(), strict=True):
            writer.writerow([_cell(names[row]), *(f"{x:.6g}" for x in p)])
