"""The run folder: its file names, the atomic writes that keep every file whole, the checkpoint of the weights
(best or last) and reading a finished run back.

A run folder holds:
- `model.safetensors` and `config.json`: the classifier as its family's AutoModelForSequenceClassification
  (`fastcls.models.hf_layout`), so transformers' `from_pretrained` and `pipeline` load it with the labels by name;
- `fastcls_head.safetensors`: fastcls's own head, exactly; both weight files carry one checkpoint tag, and a
  folder whose two files disagree (a write interrupted between them) is refused on load;
- `fastcls.json` (head and data facts), `labels.json`, the tokenizer files, `train_config.json`,
  `metrics.jsonl` (one line per evaluation) and `trainer_state.json` (the run's figures).
"""
import json
import os
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from transformers import AutoConfig

from fastcls.data import LabelMap
from fastcls.errors import ModelLoadError
from fastcls.models.classifier import EncoderClassifier, choose_packed
from fastcls.models.hf_layout import encoder_state_from_hf, hf_config, hf_state_dict
from fastcls.models.loading import check_model_dir, encoder_from_config, load_tokenizer

WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "fastcls_head.safetensors"
FASTCLS_FILE = "fastcls.json"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
STATE_FILE = "trainer_state.json"
FORMAT = 2  # fastcls.json's "format": 2 = weights in transformers' layout plus the exact head
TAG = "fastcls_checkpoint"  # the metadata key both weight files share


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_weights_atomic(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared storage and non-contiguous views: hand it plain copies
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    _atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_json_atomic(obj, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(Path(path), write)


class Checkpointer:
    """Writes one run folder `out`; see the module docstring for its files."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.metrics_path = self.out / METRICS_FILE

    def holds_a_model(self) -> bool:
        return any((self.out / name).exists() for name in (WEIGHTS_FILE, HEAD_FILE, FASTCLS_FILE))

    def write_static(self, model: EncoderClassifier, tokenizer, labels: LabelMap, meta: dict, train_config: dict):
        """What does not change during training: written once, before the first checkpoint."""
        self.out.mkdir(parents=True, exist_ok=True)
        if hasattr(model.encoder, "config") and hasattr(model.encoder.config, "save_pretrained"):
            hf_config(model.encoder, labels).save_pretrained(self.out)
        tokenizer.save_pretrained(self.out)
        labels.save(self.out / LABELS_FILE)
        save_json_atomic({"format": FORMAT, "num_labels": model.num_labels, "head_dropout": model.head.dropout_p,
                          **meta}, self.out / FASTCLS_FILE)
        self.write_train_config(train_config)
        self.metrics_path.unlink(missing_ok=True)

    def write_train_config(self, train_config: dict) -> None:
        save_json_atomic(train_config, self.out / CONFIG_FILE)

    def save(self, model: EncoderClassifier) -> None:
        """The model's weights as the run's checkpoint: the exact head first, then the transformers layout, under
        one fresh tag."""
        tag = {TAG: uuid.uuid4().hex, "format": "pt"}  # "format": what transformers' loader looks for
        head = model.head.linear
        save_weights_atomic({"weight": head.weight, "bias": head.bias}, self.out / HEAD_FILE, tag)
        save_weights_atomic(hf_state_dict(model), self.out / WEIGHTS_FILE, tag)

    def load_into(self, model: EncoderClassifier) -> None:
        """Put the checkpoint's weights back into `model` (in place, on its device)."""
        load_weights(model, self.out)

    def write_state(self, state: dict) -> None:
        save_json_atomic(state, self.out / STATE_FILE)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    try:
        with safe_open(path, framework="pt") as f:
            tag = (f.metadata() or {}).get(TAG)
        return load_file(path), tag
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({err})") from err


def load_weights(model: EncoderClassifier, folder: Path) -> None:
    """Load a run folder's checkpoint into `model`; any missing, unexpected or misshapen weight is an error."""
    weights, weights_tag = _read_tensors(folder / WEIGHTS_FILE)
    head, head_tag = _read_tensors(folder / HEAD_FILE)
    if weights_tag != head_tag:
        raise ModelLoadError(f"{folder}: {WEIGHTS_FILE} and {HEAD_FILE} come from different checkpoints "
                             "(a save was interrupted between them); train again or restore both files")
    encoder_state, stray = encoder_state_from_hf(model.encoder, weights)
    mismatch = f"{folder / WEIGHTS_FILE} does not match the model in {folder / 'config.json'}"
    if stray:
        raise ModelLoadError(f"{mismatch}: unexpected {stray[:5]}")
    try:
        missing, unexpected = model.encoder.load_state_dict(encoder_state, strict=False)
        model.head.linear.load_state_dict(head)
    except RuntimeError as err:  # shapes differ
        raise ModelLoadError(f"{mismatch}: {err}") from err
    if missing or unexpected:
        raise ModelLoadError(f"{mismatch}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def read_meta(folder: Path, argument: str = "--model") -> tuple[dict, LabelMap]:
    for name in (FASTCLS_FILE, LABELS_FILE, WEIGHTS_FILE, HEAD_FILE):
        if not (folder / name).is_file():
            raise ModelLoadError(f"{argument}: {folder} lacks {name}; is it a folder written by `fastcls train`?")
    try:
        meta = json.loads((folder / FASTCLS_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{folder / FASTCLS_FILE}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("num_labels"), int):
        raise ModelLoadError(f"{folder / FASTCLS_FILE}: not a fastcls run folder of format {FORMAT} "
                             "(train it again with this fastcls)")
    labels = LabelMap.load(folder / LABELS_FILE)
    if len(labels) != meta["num_labels"]:
        raise ModelLoadError(f"{folder}: labels.json has {len(labels)} labels, fastcls.json {meta['num_labels']}")
    return meta, labels


def load_run(folder: str | Path, device: str | torch.device = "cpu", *, encoder=None, argument: str = "--model"):
    """A folder written by `fastcls train` -> (model in eval mode on `device`, tokenizer, labels, fastcls.json).
    `encoder`: the module to load the weights into, for runs of an encoder that has no transformers config."""
    folder = check_model_dir(folder, argument) if encoder is None else Path(folder)
    meta, labels = read_meta(folder, argument)
    if encoder is None:
        encoder = encoder_from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    device = torch.device(device)
    model = EncoderClassifier(encoder, meta["num_labels"], meta["head_dropout"],
                              packed=choose_packed("auto", encoder, device))
    load_weights(model, folder)
    return model.to(device).eval(), load_tokenizer(folder, argument), labels, meta
