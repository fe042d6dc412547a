"""The resumable training state: `--save-every N` writes it every N optimizer steps, SIGINT and SIGTERM write it
before stopping, and `--resume RUN_DIR` continues the run from the newest one.

A resumable checkpoint is a folder RUN_DIR/checkpoints/step-000120/ (the optimizer steps done):
- `weights.safetensors`: every parameter and buffer of the model under fastcls's names (fp32 masters), exactly;
- `optimizer.pt`, `scheduler.pt`, `scaler.pt`: their state_dicts (torch.save, read back with weights_only=True);
- `rank_state_{rank}.pt`, one per rank (torchrun), written by that rank: its generators (Python's `random`,
  numpy's global one, torch's CPU and CUDA ones, fastcls's dropout generator: seed and base counter, which
  differ per rank), its loss sum and its counters (`Loop`: the padding and tokens are per rank);
- `trainer_state.json`: the format, the loop's position (epoch, micro-batches of it done: an epoch's batch order
  is a function of the seed and the epoch, so the position fixes the rest), TrainState's fields, early stopping,
  the evaluations so far, the world size, the thread count and a digest of the tokenised training rows;
- `metrics.jsonl`: the run folder's of that moment (every train and eval record so far), which a resume puts back;
- `best/`: hard links to the run folder's best-checkpoint files of that moment (no copy), which a resume puts
  back: a best checkpoint saved after this one belongs to the work the resume redoes.

Writes are atomic: everything goes into checkpoints/.tmp-step-000120/, each file fsynced, and one rename by rank 0
(after a barrier: every rank's file is on disk) commits the folder, so every step-* folder is complete and
`--resume` takes the newest. Every file but the per-rank ones is rank 0's to write. A killed write leaves only a
temporary folder, which the next run removes. Checkpoints beyond `--save-total-limit` are removed (renamed
away, then deleted) only after the new one is committed.
"""
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastcls.components.checkpoint import (CONFIG_FILE, HEAD_FILE, METRICS_FILE, WEIGHTS_FILE, remove_temp_files,
                                          save_text_atomic)
from fastcls.components.distributed import Distributed
from fastcls.components.precision import autocast
from fastcls.components.signals import StopOnSignal
from fastcls.config import TrainConfig, flag
from fastcls.data import collate
from fastcls.errors import ConfigError

FORMAT = 2  # 2: the loss sum on the device since the last read, its reads on the host (Loop.loss), metrics.jsonl
CHECKPOINTS = "checkpoints"
PREFIX = "step-"
TEMP = ".tmp-"  # a write in progress, or killed
TRASH = ".trash-"  # a pruned checkpoint being deleted
WEIGHTS = "weights.safetensors"
STATE = "trainer_state.json"
BEST = "best"
PARTS = ("optimizer", "scheduler", "scaler")
# settings a resumed run may change: none of them changes what the run computes (`device` and `eval_batch_size`
# can change the last bits of the weights or of the metrics; bitwise equality holds on the same device)
CHANGEABLE = {"output", "device", "eval_batch_size", "log_every", "save_every", "save_total_limit",
              "cache_budget_gb", "deterministic", "overwrite", "report_to", "logging_dir", "plot"}


@dataclass
class Loop:
    """Where the loop stands and what it has counted (this rank): saved with every checkpoint, restored on
    resume."""
    micro: int = 0  # micro-batches of the current epoch done (the next one's index)
    samples: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    rank_tokens: int = 0
    train_seconds: float = 0.0
    epoch_start: float = 0.0  # train_seconds when the current epoch began
    epoch_seconds: list[float] = field(default_factory=list)
    loss: dict = field(default_factory=dict)  # the reported loss's host state (fastcls.components.train_loss)


@dataclass
class Training:
    """What a checkpoint holds the state of."""
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    scaler: object
    generator: object  # fastcls.ops.dropout.DropoutGenerator
    state: object  # fastcls.components.callbacks.TrainState
    stopping: object  # fastcls.components.early_stopping.EarlyStopping
    loss_sum: torch.Tensor  # this rank's training loss summed on the device since the last read
    data: str  # data_digest of the training set: a resume refuses other rows behind the same file name


def data_digest(encoded) -> str:
    """sha256 of the tokenised training rows and their labels (what the run trains on, whatever their source)."""
    digest = hashlib.sha256()
    for array in (encoded.input_ids, encoded.lengths, encoded.labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _step_of(folder: Path) -> int:
    return int(folder.name[len(PREFIX):])


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's committed resumable checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=_step_of)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, write) -> None:
    write(path)
    _fsync(path)


class Resumer:
    """Writes one run's resumable checkpoints and reads them back, every rank calling each method; `signals` is
    the SIGINT/SIGTERM catcher whose first signal (on any rank) makes the next checkpoint due and then stops the
    run (`stop_signal`). `sharded` (FSDP2): the weights and the optimizer state are gathered whole into rank 0's
    files and each rank takes its shards back from them, so a sharded checkpoint reads like any other."""

    def __init__(self, run_dir: str | Path, save_every: int | None, keep: int | None,
                 ddp: Distributed = Distributed(), *, sharded: bool = False):
        self.root = Path(run_dir) / CHECKPOINTS
        self.save_every, self.keep, self.ddp, self.sharded = save_every, keep, ddp, sharded
        self.rank = ddp.rank
        self.signals = StopOnSignal()
        self.stop_signal: int | None = None  # the signal that stops the run, once every rank knows of it
        self.loaded: Path | None = None  # the checkpoint load_newest read
        if self.rank == 0 and self.root.is_dir():  # what killed writes and prunes left behind
            for leftover in self.root.iterdir():
                if leftover.name.startswith((TEMP, TRASH)):
                    shutil.rmtree(leftover, ignore_errors=True)

    def discard_all(self) -> None:
        """A fresh run in a folder (--overwrite) does not continue the checkpoints of the run it replaces."""
        if self.rank == 0 and self.root.is_dir():
            shutil.rmtree(self.root)

    def due(self, step: int, agree_now: bool = True) -> bool:
        """Whether a checkpoint is due after `step`: every --save-every steps, or once a signal came. Under
        torchrun the ranks decide on a signal together (torchrun signals every rank, not at the same step), at the
        steps where `agree_now`, which must be the same on every rank."""
        received = self.signals.received
        if self.ddp.enabled:
            received = (received or signal.SIGTERM) if agree_now and self.ddp.agree(received is not None) else None
        self.stop_signal = received
        return bool(self.save_every and step % self.save_every == 0) or received is not None

    def save(self, t: Training, loop: Loop, epoch: int) -> Path:
        """Write the checkpoint of step `t.state.step` and commit it; returns its folder."""
        step = t.state.step
        final = self.root / f"{PREFIX}{step:06d}"
        temp = self.root / f"{TEMP}{final.name}"
        if self.rank == 0:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        self.ddp.barrier()  # every rank finds the temporary folder
        rank_state = {"rng": rng_state(t.generator), "loss_sum": t.loss_sum.item(),
                      "loop": {f.name: getattr(loop, f.name) for f in fields(loop)}}
        _write(temp / f"rank_state_{self.rank}.pt", lambda p: torch.save(rank_state, p))
        model_state, optimizer_state = self._whole_states(t)
        if self.rank == 0:
            weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
            _write(temp / WEIGHTS, lambda p: save_file(weights, p))
            states = {"optimizer": optimizer_state, "scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict()}
            for name in PARTS:
                _write(temp / f"{name}.pt", lambda p, name=name: torch.save(states[name], p))
            record = {"format": FORMAT, "world_size": self.ddp.world_size, "num_threads": torch.get_num_threads(),
                      **_train_state(t, loop, epoch)}
            _write(temp / STATE, lambda p: p.write_text(json.dumps(record, indent=1)))
            metrics = self.root.parent / METRICS_FILE
            _write(temp / METRICS_FILE, lambda p: shutil.copyfile(metrics, p) if metrics.is_file() else p.touch())
            _link_best(self.root.parent, temp / BEST)
        self.ddp.barrier()  # rank 0 commits once every rank's file is on disk
        if self.rank == 0:
            _fsync(temp)
            os.rename(temp, final)  # the commit
            _fsync(self.root)
            self._prune()
        return final

    def _whole_states(self, t: Training) -> tuple[dict | None, dict | None]:
        """The model's and the optimizer's whole state dicts on rank 0, None on the others. Under FSDP2 every rank
        takes part: the shards are gathered, in optimizer state dicts keyed by parameter name."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            states = get_state_dict(t.model, t.optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))
            return states if self.rank == 0 else (None, None)
        return (t.model.state_dict(), t.optimizer.state_dict()) if self.rank == 0 else (None, None)

    def _prune(self) -> None:
        if self.keep is None:
            return
        for old in checkpoints(self.root.parent)[:-self.keep]:
            trash = old.with_name(f"{TRASH}{old.name}")
            os.rename(old, trash)  # gone from the committed ones at once; deleted at leisure
            shutil.rmtree(trash, ignore_errors=True)

    def load_newest(self, t: Training) -> tuple[Loop, int]:
        """Put the newest checkpoint's state into `t` (in place) and the run folder's best checkpoint and
        metrics.jsonl back as they were then; returns the loop's position and counters, and the thread count the
        run had."""
        folder = self.loaded = checkpoints(self.root.parent)[-1]
        try:
            loop, threads = self._load(folder, t)
            records = (folder / METRICS_FILE).read_text(encoding="utf-8") if self.rank == 0 else ""
        except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"--resume: {folder} cannot be read back ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}); remove it to resume from the one "
                              f"before") from err
        if self.rank == 0:
            remove_temp_files(self.root.parent)  # of a killed best-checkpoint write
            _restore_best(folder / BEST, self.root.parent)
            save_text_atomic(records, self.root.parent / METRICS_FILE)  # what comes after the checkpoint is redone
        return loop, threads

    def _load(self, folder: Path, t: Training) -> tuple[Loop, int]:
        saved = json.loads((folder / STATE).read_text())
        if saved.get("format") != FORMAT:
            raise ConfigError(f"--resume: {folder} is a checkpoint of format {saved.get('format')}, this fastcls "
                              f"reads format {FORMAT}")
        if saved["data"] != t.data:
            raise ConfigError(f"--train: the training rows differ from those the run in {self.root.parent} trained "
                              f"on (the file changed since?); a resumed run needs the same rows")
        if saved["world_size"] != self.ddp.world_size:
            raise ConfigError(f"--resume: {folder} was written by {saved['world_size']} processes, this run has "
                              f"{self.ddp.world_size}")
        device = t.loss_sum.device
        states = {name: torch.load(folder / f"{name}.pt", map_location=device, weights_only=True) for name in PARTS}
        if self.sharded:  # every rank reads the whole files and keeps its shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(t.model, t.optimizer, model_state_dict=load_file(folder / WEIGHTS),
                           optim_state_dict=states["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            t.model.load_state_dict(load_file(folder / WEIGHTS))
            t.optimizer.load_state_dict(states["optimizer"])
        for name in PARTS[1:]:  # after the optimizer: the device schedule re-installs its lr tensors in it
            getattr(t, name).load_state_dict(states[name])
        mine = torch.load(folder / f"rank_state_{self.rank}.pt", weights_only=True)
        set_rng_state(mine["rng"], t.generator)
        s, stopping = t.state, t.stopping
        s.step, s.epoch, s.best, s.log = saved["step"], saved["epoch"], saved["best"], saved["log"]
        stopping.best, stopping.evals_without_gain = saved["stopping_best"], saved["evals_without_gain"]
        # early stopping's decision stands; a callback's request to stop was this process's
        s.last_loss, s.should_stop = saved["last_loss"], stopping.should_stop
        t.loss_sum.fill_(mine["loss_sum"])
        return Loop(**mine["loop"]), saved["num_threads"]


def _link_best(run: Path, best: Path) -> None:
    for name in (HEAD_FILE, WEIGHTS_FILE):
        if (run / name).is_file():
            best.mkdir(exist_ok=True)
            try:
                os.link(run / name, best / name)
            except OSError:  # a file system without hard links
                shutil.copyfile(run / name, best / name)
                _fsync(best / name)


def _restore_best(best: Path, run: Path) -> None:
    """The run's best-checkpoint files as the checkpoint saw them (the head first, as Checkpointer.save writes:
    until the weights follow, the two files' tags differ and a reader refuses the pair)."""
    for name in (HEAD_FILE, WEIGHTS_FILE):
        if not (best / name).is_file() or ((run / name).is_file() and os.path.samefile(best / name, run / name)):
            continue
        fd, temp = tempfile.mkstemp(dir=run, prefix=f".{name}.", suffix=".tmp")  # remove_temp_files' pattern
        os.close(fd)
        os.unlink(temp)
        try:
            os.link(best / name, temp)
        except OSError:
            shutil.copyfile(best / name, temp)
            _fsync(temp)
        os.replace(temp, run / name)


def _train_state(t: Training, loop: Loop, epoch: int) -> dict:
    s = t.state
    return {"data": t.data, "step": s.step, "epoch": epoch, "best": s.best, "log": s.log, "last_loss": s.last_loss,
            "stopping_best": t.stopping.best,
            "evals_without_gain": t.stopping.evals_without_gain,
            "loop": {f.name: getattr(loop, f.name) for f in fields(loop)}}  # rank 0's, for reading


def rng_state(generator) -> dict:
    """This process's generators: plain lists and tensors, which torch.load reads with weights_only=True."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
             "torch": torch.get_rng_state(), "dropout": generator.state_dict()}
    if torch.cuda.is_available() and generator.state.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(generator.state.device)
    return state


def set_rng_state(state: dict, generator) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], generator.state.device)
    generator.load_state_dict(state["dropout"])


def refill_prefix_cache(model, train_set, batches, epoch: int, micro: int, device, precision: str, pad_id: int,
                        ddp: Distributed = Distributed()) -> None:
    """Store in the (empty) frozen-prefix cache what the interrupted run had stored: the prefix's output for the
    first epoch's batches run before the checkpoint, computed batch by batch as they ran then (a row's output in
    another batch may differ in its last bits: the matrix products' blocking follows the batch's shape)."""
    done = batches.batches(0)[:micro] if epoch == 0 else batches.batches(0)
    with torch.no_grad(), autocast(device, precision):
        for global_rows in done:
            rows, _ = ddp.share(global_rows)  # this rank's share, as it ran
            model.body.fill_prefix_cache(collate(train_set, rows, packed=True, pad_token_id=pad_id).to(device))


def find_run(resume: str | Path, output: str | None) -> Path:
    """The run folder `--resume` names: a folder, or "latest": `output`, else the newest folder under the default
    fastcls_runs/. It must hold a committed resumable checkpoint."""
    if str(resume) == "latest":
        if output is not None:
            run = Path(output)
        else:
            root = Path("fastcls_runs")
            runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            if not runs:
                raise ConfigError("--resume latest: no run in fastcls_runs/ (name the run folder, or give --output)")
            run = runs[-1]
    else:
        run = Path(resume)
    if not run.is_dir():
        raise ConfigError(f"--resume: {run} is not a folder")
    if not checkpoints(run):
        raise ConfigError(f"--resume: {run} holds no resumable checkpoint (they are written by --save-every N, and "
                          f"when SIGINT or SIGTERM stops a run)")
    return run


def resumed_config(run: Path, overrides: dict) -> TrainConfig:
    """The run's own settings (its train_config.json) with `overrides` applied where they change nothing the run
    computes; any other change is refused, naming its flag. Rows given in memory (Python API) are passed again."""
    path = run / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--resume: cannot read {path}: {err}") from None
    precision = saved.pop("resolved_precision", None)
    saved.pop("world_size", None)  # the run's facts, not settings; the checkpoint checks the world size
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ConfigError(f"--resume: {path} has settings this fastcls does not know: {unknown}")
    cfg = TrainConfig(**saved)
    described = cfg.to_dict()
    for name, value in overrides.items():
        if name in CHANGEABLE:
            continue
        if TrainConfig(**{name: value}).to_dict()[name] != described[name]:
            raise ConfigError(f"{flag(name)}: a resumed run keeps its setting ({described[name]!r} in {path}); "
                              f"changing it would change what the run computes")
    given_output = overrides.get("output")
    if given_output is not None and Path(given_output).resolve() != run.resolve():
        raise ConfigError(f"--output: a resumed run continues in its own folder {run}")
    changes = {k: v for k, v in overrides.items() if k != "output"}
    cfg = TrainConfig(**{**saved, **changes, "output": str(run)})
    for name in ("train", "dev"):
        value = getattr(cfg, name)
        if isinstance(value, str) and value.startswith("<in memory"):
            raise ConfigError(f"{name}: the run trained on rows in memory; pass the same rows as {name}= to resume")
    for task in cfg.tasks or []:
        if isinstance(task, dict) and any(str(task.get(k, "")).startswith("<in memory") for k in ("train", "dev")):
            raise ConfigError(f"tasks: task {task.get('name')!r} trained on rows in memory; pass the same tasks= "
                              "to resume")
    if cfg.precision == "auto" and precision is not None and "device" not in overrides:
        cfg.precision = precision  # pinned: "auto" must not resolve differently than it did
    return cfg
