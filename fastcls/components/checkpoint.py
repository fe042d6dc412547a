"""The run folder: its file names, the atomic writes that keep every file whole, the checkpoint of the weights
(best or last) and reading a finished run back.

A run folder holds:
- `model.safetensors` and `config.json`: the classifier as its family's AutoModelForSequenceClassification
  (`fastcls.models.hf_layout`), so transformers' `from_pretrained` and `pipeline` load it with the labels by name;
  a mean-pooled one as the model of `modeling_fastcls.py` beside them, which needs `trust_remote_code=True`
  (`fastcls.models.mean_pooling_hf`);
- `fastcls_head.safetensors`: fastcls's own head, exactly; both weight files carry one checkpoint tag, and a
  folder whose two files disagree (a write interrupted between them) is refused on load;
- a multi-task run instead keeps the shared encoder in `model.safetensors` under the base model's names (its
  config.json is the encoder's own) beside each task's own top layers (`task_layers.*`), and all heads in
  `fastcls_head.safetensors`; fastcls.json lists the tasks. `fastcls export --task NAME` writes one task's
  AutoModelForSequenceClassification folder;
- `fastcls.json` (head and data facts), `labels.json`, the tokenizer files, `train_config.json`,
  `metrics.jsonl` (train and eval records: fastcls.components.metrics), `trainer_state.json` (the run's figures)
  and, with --plot, `metrics.png`; with --report-to tensorboard, `runs/` holds the event files
  (fastcls/components/reporters.py).

The folder is consistent at every moment: a new run (--overwrite) first removes the old model's files, the
weights first and fastcls.json last, so every state in between lacks a file that loading requires; fastcls.json
is written after every other static file and names the run, whose id both weight files carry and loading checks.
fastcls never writes through a symlink in the folder: every file is written beside its name and moved over it,
which replaces a link, never its target. Temporary files a killed write left behind are removed by the next run.
"""
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from fastcls.components.output_path import atomic_write, save_text_atomic
from fastcls.config import POOLINGS
from fastcls.data import LabelMap, TaskLabels, load_labels
from fastcls.errors import ModelLoadError
from fastcls.models import mean_pooling_hf
from fastcls.models.classifier import EncoderClassifier, Tasks, choose_packed
from fastcls.models.hf_layout import encoder_prefix, encoder_state_from_hf, hf_config, hf_state_dict
from fastcls.models.loading import (check_model_dir, encoder_from_config, load_encoder, load_tokenizer,
                                    own_aligned_storage, read_config)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "fastcls_head.safetensors"
FASTCLS_FILE = "fastcls.json"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"  # --plot's chart of metrics.jsonl (fastcls/plot.py)
CONFIG_FILE = "train_config.json"
STATE_FILE = "trainer_state.json"
FORMAT = 2  # fastcls.json's "format": 2 = weights in transformers' layout plus the exact head
TAG = "fastcls_checkpoint"  # the metadata key both weight files share
RUN_TAG = "fastcls_run"  # the weights' metadata key for the run id that fastcls.json holds as "run_id"
# the previous run's files a new run removes first, the weights before fastcls.json (see the module docstring)
OLD_RUN_FILES = (WEIGHTS_FILE, HEAD_FILE, STATE_FILE, METRICS_FILE, PLOT_FILE, CONFIG_FILE, LABELS_FILE,
                 mean_pooling_hf.MODELING_FILE, FASTCLS_FILE)
# the names of atomic_write's and save_pretrained_files' temporary files (tempfile adds 8 characters of
# [a-z0-9_]): what a killed write leaves behind
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
FASTCLS_META_TYPES = {"format": int, "num_labels": int, "head_dropout": (int, float), "max_length": int}


def save_weights_atomic(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared storage and non-contiguous views: hand it plain copies
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_pretrained_files(folder: Path, *objects) -> None:
    """`obj.save_pretrained(folder)` for each object (a config, a tokenizer) without writing through a symlink in
    `folder`: saved into a temporary folder beside, then moved in file by file."""
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging.", suffix=".tmp"))
    try:
        for obj in objects:
            obj.save_pretrained(staging)
        for path in staging.iterdir():
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_transformers_files(folder: Path, model: EncoderClassifier, labels: LabelMap, tokenizer) -> None:
    """config.json with the labels by name and the tokenizer files, and for a mean-pooled model the code of the
    model that config.json names (`fastcls.models.mean_pooling_hf`): what transformers loads beside the weights
    of `hf_state_dict`."""
    if model.pooling == "mean" and mean_pooling_hf.supported(model.encoder):
        save_pretrained_files(folder, tokenizer)
        save_text_atomic(mean_pooling_hf.modeling_code(model.encoder), folder / mean_pooling_hf.MODELING_FILE)
        save_json_atomic(mean_pooling_hf.mean_pooling_config(model.encoder, labels), folder / "config.json")
    else:
        save_pretrained_files(folder, hf_config(model.encoder, labels), tokenizer)


def remove_temp_files(folder: Path) -> None:
    """Remove the temporary files and folders a killed write left in `folder` (fastcls's own names only)."""
    for path in folder.iterdir():
        if TEMP_NAME.fullmatch(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def save_json_atomic(obj, path: Path) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(Path(path), write)


class Checkpointer:
    """Writes one run folder `out`; see the module docstring for its files."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.metrics_path = self.out / METRICS_FILE
        self.run_id: str | None = None  # a fresh one from write_static; else (a continued run) fastcls.json's

    def holds_a_model(self) -> bool:
        return any((self.out / name).exists() for name in (WEIGHTS_FILE, HEAD_FILE, FASTCLS_FILE))

    def write_static(self, model: EncoderClassifier, tokenizer, labels: LabelMap, meta: dict, train_config: dict):
        """What does not change during training: written once, before the first checkpoint, after the previous
        run's model (--overwrite) and any orphaned temporary files are gone."""
        self.out.mkdir(parents=True, exist_ok=True)
        for name in OLD_RUN_FILES:
            (self.out / name).unlink(missing_ok=True)
        remove_temp_files(self.out)
        self.run_id = uuid.uuid4().hex
        if hasattr(model.encoder, "config") and hasattr(model.encoder.config, "save_pretrained"):
            if model.tasks is not None:  # its config is the encoder's own: no single label set describes it
                save_pretrained_files(self.out, model.encoder.config, tokenizer)
            else:
                save_transformers_files(self.out, model, labels, tokenizer)
        else:
            save_pretrained_files(self.out, tokenizer)
        save_json_atomic(labels.to_dict(), self.out / LABELS_FILE)
        save_json_atomic(train_config, self.out / CONFIG_FILE)
        tasks = {"tasks": dataclasses.asdict(model.tasks)} if model.tasks is not None else {}
        save_json_atomic({"format": FORMAT, "num_labels": model.num_labels, "head_dropout": model.head.dropout_p,
                          "pooling": model.pooling, "run_id": self.run_id, **tasks, **meta}, self.out / FASTCLS_FILE)

    def write_train_config(self, train_config: dict) -> None:
        save_json_atomic(train_config, self.out / CONFIG_FILE)

    def save(self, model: EncoderClassifier) -> None:
        """The model's weights as the run's checkpoint: the exact head first, then the transformers layout, under
        one fresh tag and the run's id."""
        if self.run_id is None:  # a run continued in its folder without write_static keeps its id
            self.run_id = _read_json(self.out / FASTCLS_FILE).get("run_id")
        tag = {TAG: uuid.uuid4().hex, "format": "pt"}  # "format": what transformers' loader looks for
        if self.run_id is not None:
            tag[RUN_TAG] = self.run_id
        if model.tasks is not None:
            save_weights_atomic(model.head.state_dict(), self.out / HEAD_FILE, tag)
            save_weights_atomic(_multi_task_weights(model), self.out / WEIGHTS_FILE, tag)
            return
        head = model.head.linear
        save_weights_atomic({"weight": head.weight, "bias": head.bias}, self.out / HEAD_FILE, tag)
        save_weights_atomic(hf_state_dict(model), self.out / WEIGHTS_FILE, tag)

    def load_into(self, model: EncoderClassifier) -> None:
        """Put the checkpoint's weights back into `model` (in place, on its device)."""
        load_weights(model, self.out)

    def write_state(self, state: dict) -> None:
        save_json_atomic(state, self.out / STATE_FILE)


def _multi_task_weights(model: EncoderClassifier) -> dict[str, torch.Tensor]:
    """The shared encoder under its base model's names, and the tasks' own top layers under `task_layers.`."""
    prefix = encoder_prefix(model.encoder)
    state = {f"{prefix}.{name}": tensor for name, tensor in model.encoder.state_dict().items()}
    if model.task_layers is not None:
        state.update({f"task_layers.{name}": tensor for name, tensor in model.task_layers.state_dict().items()})
    return state


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({err})") from err


def load_weights(model: EncoderClassifier, folder: Path, run_id: str | None = None) -> None:
    """Load a run folder's checkpoint into `model`; any missing, unexpected or misshapen weight is an error, and
    so are weight files of another checkpoint or (given `run_id`, fastcls.json's) of another run."""
    weights, weights_tags = _read_tensors(folder / WEIGHTS_FILE)
    head, head_tags = _read_tensors(folder / HEAD_FILE)
    if weights_tags.get(TAG) != head_tags.get(TAG):
        raise ModelLoadError(f"{folder}: {WEIGHTS_FILE} and {HEAD_FILE} come from different checkpoints "
                             "(a save was interrupted between them); train again or restore both files")
    if run_id is not None and weights_tags.get(RUN_TAG) != run_id:
        raise ModelLoadError(f"{folder}: {WEIGHTS_FILE} is not from the run that {FASTCLS_FILE} describes (a new "
                             "run into this folder was interrupted); train again")
    task_layers = {k[len("task_layers."):]: weights.pop(k) for k in list(weights) if k.startswith("task_layers.")}
    encoder_state, stray = encoder_state_from_hf(model.encoder, weights, model.pooling)
    mismatch = f"{folder / WEIGHTS_FILE} does not match the model in {folder / 'config.json'}"
    if stray or bool(task_layers) != (model.task_layers is not None):
        raise ModelLoadError(f"{mismatch}: unexpected {(stray or sorted(task_layers) or ['no task_layers'])[:5]}")
    try:
        missing, unexpected = model.encoder.load_state_dict(encoder_state, strict=False)
        if model.tasks is not None:
            model.head.load_state_dict(head)
        else:
            model.head.linear.load_state_dict(head)
        if model.task_layers is not None:
            model.task_layers.load_state_dict(task_layers)
    except RuntimeError as err:  # shapes differ, or a multi-task head's names
        raise ModelLoadError(f"{mismatch}: {err}") from err
    if missing or unexpected:
        raise ModelLoadError(f"{mismatch}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_meta(folder: Path, argument: str = "--model") -> tuple[dict, LabelMap]:
    for name in (FASTCLS_FILE, LABELS_FILE, WEIGHTS_FILE, HEAD_FILE):
        if not (folder / name).is_file():
            raise ModelLoadError(f"{argument}: {folder} lacks {name}; is it a folder written by `fastcls train`?")
    meta = _read_json(folder / FASTCLS_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelLoadError(f"{folder / FASTCLS_FILE}: not a fastcls run folder of format {FORMAT} "
                             "(train it again with this fastcls)")
    for key, kind in FASTCLS_META_TYPES.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            what = f"{key!r} is {meta[key]!r}" if key in meta else f"lacks {key!r}"
            raise ModelLoadError(f"{folder / FASTCLS_FILE}: incomplete or damaged: {what}; train again")
    try:
        labels = load_labels(folder / LABELS_FILE)
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{folder / LABELS_FILE}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    count = len(labels) if isinstance(labels, LabelMap) else sum(labels.num_labels)
    if count != meta["num_labels"]:
        raise ModelLoadError(f"{folder}: labels.json has {count} labels, fastcls.json {meta['num_labels']}")
    meta.setdefault("pooling", "cls")  # runs from before --pooling
    if meta["pooling"] not in POOLINGS:
        raise ModelLoadError(f"{folder / FASTCLS_FILE}: 'pooling' is {meta['pooling']!r}, not one of "
                             f"{', '.join(POOLINGS)}; train again")
    if isinstance(labels, TaskLabels) != ("tasks" in meta):
        raise ModelLoadError(f"{folder}: labels.json and fastcls.json disagree on whether the run is multi-task")
    if "tasks" in meta:
        try:
            tasks = Tasks(**meta["tasks"])
        except TypeError as err:
            raise ModelLoadError(f"{folder / FASTCLS_FILE}: its 'tasks' entry is damaged ({err}); train again") from None
        if tasks.names != labels.names or tasks.num_labels != labels.num_labels:
            raise ModelLoadError(f"{folder}: the tasks of labels.json and fastcls.json differ")
        meta["tasks"] = tasks
    return meta, labels


def load_run(folder: str | Path, device: str | torch.device = "cpu", *, encoder=None, argument: str = "--model"):
    """A folder written by `fastcls train` -> (model in eval mode on `device`, tokenizer, labels, fastcls.json).
    `encoder`: the module to load the weights into, for runs of an encoder that has no transformers config."""
    folder = check_model_dir(folder, argument) if encoder is None else Path(folder)
    meta, labels = read_meta(folder, argument)
    if encoder is None:
        try:
            encoder = encoder_from_config(read_config(folder, argument))
        except ValueError as err:  # a config.json that reads but describes no buildable model
            raise ModelLoadError(f"{argument}: {folder / 'config.json'}: {err}") from err
    device = torch.device(device)
    model = EncoderClassifier(encoder, meta["num_labels"], meta["head_dropout"],
                              packed=choose_packed("auto", encoder, device), tasks=meta.get("tasks"),
                              pooling=meta["pooling"])
    load_weights(model, folder, meta.get("run_id"))
    return model.to(device).eval(), load_tokenizer(folder, argument), labels, meta


def load_start(path: str | Path, labels: LabelMap) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
    """What `fastcls train --model PATH` starts from: (the encoder, the head's weights or None for a fresh head).
    A Hugging Face folder gives its encoder. A folder written by `fastcls train` gives its checkpoint, checked as
    for `eval`: the encoder's weights exactly, and the head's too when the run's labels are these; the run says
    which in its first logged line."""
    folder = Path(path)
    if not (folder / FASTCLS_FILE).exists() and not (folder / HEAD_FILE).exists():
        return load_encoder(folder), None
    model, _, run_labels, meta = load_run(folder)
    if "tasks" in meta:
        raise ModelLoadError(f"--model {folder}: a multi-task run; continue from one task's model (`fastcls export "
                             "--task NAME`) or train the tasks again from its base encoder")
    encoder = own_aligned_storage(model.encoder.train())
    if run_labels == labels:
        log.info(f"--model {folder}: continuing from the run's checkpoint, encoder and head")
        return encoder, {name: t.detach().clone() for name, t in model.head.linear.state_dict().items()}
    log.info(f"--model {folder}: continuing from the run's encoder with a fresh head: its labels "
             f"{run_labels.names} are not these {labels.names}")
    return encoder, None
