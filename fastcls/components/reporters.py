"""Loggers (`--report-to`, the HF Trainer's flag) and the end-of-run chart (`--plot`), as callbacks built from the
config: `report_callbacks(cfg, main)` checks that their packages are installed before any training and returns the
callbacks for rank 0 (under torchrun the other ranks report nothing).

TensorBoard gets the scalars under the names the HF Trainer gives them (its `rewrite_logs`: "train/" + the log
key, "eval/" + the key without "eval_"), at the optimizer step: train/loss, train/learning_rate, train/epoch,
eval/loss, eval/accuracy, eval/macro_f1 and, in multi-task runs, eval/TASK/accuracy, eval/TASK/macro_f1,
eval/TASK/loss; fastcls's throughput as train/samples_per_second, train/tokens_per_second and train/memory_mb.
The run's settings and the encoder's config go in as the texts "args" and "model_config", as the HF Trainer's.

Folders: `--logging-dir`, else OUTPUT/runs/<date-time>_<host> (the HF Trainer's OUTPUT/runs/<date>_<host>). A
resumed run continues in the run's newest runs/ folder (or the given one) with `purge_step` at its first step:
TensorBoard drops what the interrupted run logged after the checkpoint, so every step shows once.
"""
import json
import socket
from datetime import datetime
from pathlib import Path

from fastcls.components.callbacks import Callback, TrainState
from fastcls.errors import ConfigError

LOGGING_FOLDER = "runs"


def _summary_writer():
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    return SummaryWriter


class Reporter(Callback):
    """A callback that only reports: rank 0's alone, it never stops training (so the ranks need not agree on a
    stop for it), and `close` is called at the end of training, errors included."""

    def close(self) -> None:
        pass


def installed_integrations() -> list[str]:
    """`--report-to all`: every supported integration whose package imports."""
    try:
        _summary_writer()
    except ImportError:
        return []
    return ["tensorboard"]


def report_callbacks(cfg, main: bool) -> list[Reporter]:
    """The loggers and chart that `cfg` (resolved) asks for; a ConfigError naming the extra when a package is
    missing. Empty on ranks other than rank 0."""
    callbacks = []
    if "tensorboard" in cfg.report_to:
        try:
            callbacks.append(TensorBoard(_summary_writer(), cfg.logging_dir, cfg.to_dict()))
        except ImportError:
            raise ConfigError('--report-to tensorboard needs the tensorboard package: pip install '
                              '"fastcls[tensorboard]"') from None
    if cfg.plot:
        from fastcls.plot import require_matplotlib

        require_matplotlib("--plot")
        callbacks.append(Chart())
    return callbacks if main else []


def logging_dir(run: Path, resumed: bool) -> Path:
    """The default: a new OUTPUT/runs/<date-time>_<host>, or for a resumed run the newest one there."""
    if resumed:
        earlier = sorted(p for p in (run / LOGGING_FOLDER).glob("*") if p.is_dir())
        if earlier:
            return earlier[-1]
    return run / LOGGING_FOLDER / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}_{socket.gethostname()}"


def train_scalars(record: dict) -> dict:
    """A metrics.jsonl train record's scalars under the HF Trainer's TensorBoard names."""
    names = {"loss": "train/loss", "lr": "train/learning_rate", "epoch": "train/epoch",
             "samples_per_s": "train/samples_per_second", "tokens_per_s": "train/tokens_per_second",
             "memory_mb": "train/memory_mb"}
    return {tag: record[key] for key, tag in names.items() if record.get(key) is not None}


def eval_scalars(record: dict) -> dict:
    """A metrics.jsonl evaluation record's dev metrics under the HF Trainer's names (eval/loss, eval/accuracy...)."""
    scalars = {"eval/loss": record["dev_loss"], "eval/accuracy": record["accuracy"],
               "eval/macro_f1": record["macro_f1"]}
    for key, value in record.items():
        if "/" in key and key.rsplit("/", 1)[1] in ("accuracy", "macro_f1", "loss"):  # a task's: TASK/accuracy
            scalars[f"eval/{key}"] = value
    return scalars


class TensorBoard(Reporter):
    """`--report-to tensorboard`: an event file, flushed after every record so that a failing run keeps what was
    written; closed at the end of training (`close` also on errors: the trainer calls it)."""

    def __init__(self, summary_writer, folder: str | None, settings: dict):
        self.summary_writer, self.folder, self.settings = summary_writer, folder, settings
        self.writer = None

    def on_train_begin(self, state: TrainState) -> None:
        resumed = state.step > 0  # from a checkpoint written after step `state.step`
        folder = Path(self.folder) if self.folder is not None else logging_dir(state.output, resumed)
        self.writer = self.summary_writer(str(folder), purge_step=state.step + 1 if resumed else None)
        if not resumed:
            self.writer.add_text("args", json.dumps(self.settings, indent=2))
            config = getattr(getattr(state.model, "encoder", None), "config", None)
            if hasattr(config, "to_json_string"):  # a transformers encoder's
                self.writer.add_text("model_config", config.to_json_string())
            self.writer.flush()

    def _write(self, scalars: dict, step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def on_log(self, state: TrainState, record: dict) -> None:
        self._write(train_scalars(record), record["step"])

    def on_evaluate(self, state: TrainState, metrics: dict) -> None:
        self._write(eval_scalars(metrics), metrics["step"])

    def on_train_end(self, state: TrainState) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Chart(Reporter):
    """`--plot`: OUTPUT/metrics.png drawn from metrics.jsonl at the end of training."""

    def on_train_end(self, state: TrainState) -> None:
        from fastcls.plot import write_plot

        write_plot(state.output)
