"""`fastcls export`: a clean folder that transformers' AutoModelForSequenceClassification loads with fastcls's
predictions (config.json with the labels by name, model.safetensors, the tokenizer; for a mean-pooled model also
modeling_fastcls.py, loaded with trust_remote_code=True). A run folder already loads so; the export leaves
fastcls's own files behind. Families without a known Hugging Face head (`families.HFHead`) cannot be exported
with [CLS] pooling, nor encoders that AutoModel does not build with mean pooling: their run folders load with
`fastcls.load` and `fastcls eval/predict`."""
from pathlib import Path

from fastcls.components.checkpoint import WEIGHTS_FILE, load_run, save_transformers_files, save_weights_atomic
from fastcls.components.output_path import check_output_folder
from fastcls.data import TaskLabels
from fastcls.errors import ConfigError, ModelLoadError
from fastcls.models import mean_pooling_hf
from fastcls.models.classifier import task_classifier
from fastcls.models.families import FAMILIES, family_of
from fastcls.models.hf_layout import hf_state_dict


def export_hf(model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False, task: str | None = None) -> Path:
    """Export the run folder `model_dir` into `out_dir`, a new or empty folder (any folder with `overwrite`). A
    multi-task run exports one `task` at a time: the shared encoder with that task's own layers and head."""
    out_dir = check_output_folder(out_dir, overwrite)
    model, tokenizer, labels, _ = load_run(model_dir)
    if isinstance(labels, TaskLabels):
        if task is None:
            raise ConfigError(f"export: {model_dir} is a multi-task run; name the task to export with --task "
                              f"({', '.join(labels.names)})")
        index = labels.index(task)
        model, labels = task_classifier(model, index), labels.maps[index]
    elif task is not None:
        raise ConfigError(f"--task {task}: {model_dir} is a single-task run; export it without --task")
    family = family_of(model.encoder)
    if model.pooling == "mean" and not mean_pooling_hf.supported(model.encoder):
        raise ModelLoadError(
            f"export: --pooling mean: model type {model.encoder.config.model_type!r} is not one transformers' "
            f"AutoModel builds, which the exported model needs; the fastcls folder {model_dir} still loads with "
            "`fastcls eval/predict`")
    if model.pooling == "cls" and (family is None or family.hf_head is None):
        supported = sorted(name for name, f in FAMILIES.items() if f.hf_head is not None)
        raise ModelLoadError(
            f"export: model type {model.encoder.config.model_type!r} is not supported (supported: "
            f"{', '.join(supported)}); the fastcls folder {model_dir} still loads with `fastcls eval/predict`")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_transformers_files(out_dir, model, labels, tokenizer)
    save_weights_atomic(hf_state_dict(model), out_dir / WEIGHTS_FILE, {"format": "pt"})
    return out_dir
