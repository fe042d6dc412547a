"""End to end: fine-tune an encoder with fastcls (each feature on and off) and with the Hugging Face Trainer.

    python benchmarks/e2e.py [--encoder minilm|bert-base] [--device cpu|cuda] [--rows N] [--epochs 1]
                             [--frozen-epochs 3] [--runs a,b,...|all] [--json FILE] [--chart FILE.png]

Every run: the first --rows training rows of --dataset (SST-2 by default; AG News: title and description as one
text; default 4,000 rows on the CPU, 16,000 on CUDA), batch 32, lr 5e-5, max length 128, 6% warmup, weight
decay 0.01, evaluated on the data set's dev set. Each run is its own
process, so its peak memory (CPU: peak RSS; CUDA: torch.cuda.max_memory_allocated) is its own. Prints one
table with the ratio of each run's samples/s to the Trainer's best flags, measured in the same invocation.

--encoder bert-base builds a BERT-base-sized encoder (768 hidden, 12 layers, 12 heads, 3072 intermediate)
with the MiniLM vocabulary and tokenizer, randomly initialised from --seed, saved once so that every run
loads the same weights. It measures speed at BERT-base's size; its dev accuracy is near chance.

The frozen runs (embeddings and the bottom half of the layers frozen) train --frozen-epochs epochs, since
their cache of the frozen prefix's output only pays from the second epoch on; the row fastcls-<N>ep is full
training for the same number of epochs, to compare against.

The default list leaves out fastcls-no-kernels and hf-defaults, the two slowest runs on the CPU, and on the CPU
fastcls-graphs (CUDA graphs need CUDA); `--runs all` runs everything, `--runs targets` the runs the end-to-end
targets compare: fastcls, fastcls-graphs, hf-defaults, hf-best. On SIGTERM (for instance from `timeout`), the
runs finished so far are still reported.

On CUDA each row also reports gpu_busy: the mean NVML GPU utilisation (the fraction of time a kernel was running)
sampled every 20 ms from 10% to 90% of the training steps, through a training callback; None where NVML is
unavailable. It is a coarse figure (the driver averages over its own sample period, 1/6 s to 1 s).

Over ~400 lines because every configuration it compares (fastcls's and the Trainer's, each in its own worker
process) must run from this one file, so that a table's rows share their data, model and settings.
"""
import argparse
import csv
import ctypes
import dataclasses
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # ../shared/data beside the project root
REFERENCE_RUN = "hf-best"
DATASET_NAMES = {"sst2": "SST-2", "agnews": "AG News"}
BASELINE_RUN = "fastcls-baseline"  # --baseline: the default configuration from another checkout
HALF_FROZEN = {"freeze_embeddings": True, "freeze_layers": "half"}
# What each fastcls run sets on TrainConfig; "half" becomes num_hidden_layers // 2 of the encoder.
FASTCLS_RUNS = {
    "fastcls": {},
    "fastcls-fp32": {"precision": "fp32"},
    # the default (--unpad auto) is unpadded on the CPU and padded on CUDA: these two show the other choice
    "fastcls-padded": {"unpad": "off"},
    "fastcls-unpadded": {"unpad": "on"},
    "fastcls-no-kernels": {"kernels": False, "head_impl": "reference"},
    "fastcls-checkpointing": {"grad_checkpointing": True},
    "fastcls-frozen-half": {**HALF_FROZEN, "cache_frozen": True},
    "fastcls-frozen-half-nocache": {**HALF_FROZEN, "cache_frozen": False},
    # the defaults with each step replayed from CUDA graphs (`fastcls train --cuda-graphs on`): CUDA only
    "fastcls-graphs": {"cuda_graphs": "on"},
}
FROZEN_RUNS = ("fastcls-frozen-half", "fastcls-frozen-half-nocache")
HF_RUNS = ("hf-defaults", "hf-best")
# Left out of the default list to keep the CPU table near 6 minutes on 2 cores (about 75 s and 100 s each);
# `--runs all` brings them back.
SLOW_RUNS = ("fastcls-no-kernels", "hf-defaults")
CUDA_ONLY_RUNS = ("fastcls-graphs",)  # left out of the default list on the CPU, where they refuse to run
# named lists for --runs: "targets" is what the issue's end-to-end targets compare (fastcls against the faster of
# the Trainer's defaults and its best flags), for either encoder
RUN_SETS = {"targets": ["fastcls", "fastcls-graphs", "hf-defaults", "hf-best"]}
RUN_SET_TEXT = {name: ",".join(runs) for name, runs in RUN_SETS.items()}
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
ENCODER_NAMES = {"minilm": "all-MiniLM-L6-v2", "bert-base": "BERT-base-sized encoder (random init)"}


class Stopped(Exception):
    """SIGTERM arrived: report the runs finished so far."""


def full_training_run(frozen_epochs: float) -> str:
    return f"fastcls-{frozen_epochs:g}ep"


def known_runs(epochs: float, frozen_epochs: float) -> list[str]:
    """Every run name in the default order; fastcls-<N>ep only where it differs from plain fastcls."""
    extra = [full_training_run(frozen_epochs)] if frozen_epochs != epochs else []
    return [*FASTCLS_RUNS, *extra, *HF_RUNS]


def run_epochs(run: str, epochs: float, frozen_epochs: float) -> float:
    return frozen_epochs if run in FROZEN_RUNS or run == full_training_run(frozen_epochs) else epochs


def write_train_rows(dataset: str, folder: Path, rows: int, workdir: Path) -> tuple[Path, Path, int, int]:
    """The first `rows` training rows and the dev set as `label<TAB>sentence` files (AG News: labels from 0, title and
    description joined), with how many training rows that gave and the number of labels."""
    names = ("train.tsv", "dev.tsv") if dataset == "sst2" else ("train.csv", "dev.csv")
    if not all((folder / name).is_file() for name in names):
        sys.exit(f"--{dataset}: {dataset} not found at {folder} (pass a folder holding {' and '.join(names)})")
    if dataset == "sst2":
        def read(path):
            with open(path) as f:
                return [(int(r["label"]), r["sentence"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    else:
        def read(path):
            with open(path, newline="") as f:
                return [(int(r["label"]) - 1, " ".join(f"{r['title']} {r['description']}".split()))
                        for r in csv.DictReader(f)]
    train_rows, dev_rows = read(folder / names[0])[:rows], read(folder / names[1])
    if len(train_rows) < rows:
        print(f"note: {folder / names[0]} holds {len(train_rows)} rows, fewer than --rows {rows}", file=sys.stderr)
    paths = workdir / f"{dataset}_train_{rows}.tsv", workdir / f"{dataset}_dev.tsv"
    for path, part in zip(paths, (train_rows, dev_rows), strict=True):
        with open(path, "w") as f:
            f.write("label\tsentence\n")
            f.writelines(f"{label}\t{text}\n" for label, text in part)
    return *paths, len(train_rows), len({label for label, _ in train_rows + dev_rows})


def build_bert_base(tokenizer_source: Path, folder: Path, seed: int) -> Path:
    """A BERT-base-sized encoder with the source's vocabulary and tokenizer, random weights from `seed`."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(tokenizer_source, **BERT_BASE)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_source / name).is_file():
            shutil.copy(tokenizer_source / name, folder / name)
    return folder


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


class GpuBusy:
    """Mean NVML GPU utilisation while `start()`..`stop()`: polled every 20 ms on a thread. `mean` is a fraction,
    or None where NVML (libnvidia-ml) or the device is unavailable."""

    def __init__(self, device: str):
        self.samples: list[int] = []
        self.lib = self.handle = self.thread = None
        self.done = threading.Event()
        if not device.startswith("cuda"):
            return
        try:
            import torch

            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return
            handle = ctypes.c_void_p()
            index = torch.device(device).index or 0
            props = torch.cuda.get_device_properties(index)
            bus = getattr(props, "pci_bus_id", None)
            found = 1
            if bus is not None:  # the same GPU whatever CUDA_VISIBLE_DEVICES reorders
                domain, slot = getattr(props, "pci_domain_id", 0), getattr(props, "pci_device_id", 0)
                bus_id = f"{domain:08X}:{bus:02X}:{slot:02X}.0"
                found = lib.nvmlDeviceGetHandleByPciBusId_v2(bus_id.encode(), ctypes.byref(handle))
            if found != 0:
                visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
                if index < len(visible) and visible[index].strip().isdigit():
                    index = int(visible[index])
                found = lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle))
            if found == 0:
                self.lib, self.handle = lib, handle
        except Exception:  # noqa: BLE001 - no NVML: no figure
            self.lib = None

    def _poll(self) -> None:
        class Utilization(ctypes.Structure):
            _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]

        rates = Utilization()
        while not self.done.wait(0.02):
            if self.lib.nvmlDeviceGetUtilizationRates(self.handle, ctypes.byref(rates)) == 0:
                self.samples.append(rates.gpu)

    def start(self) -> None:
        if self.lib is not None and self.thread is None:
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None and not self.done.is_set():
            self.done.set()
            self.thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None

    def window(self, step: int, total: int) -> None:
        """Sample from 10% to 90% of the `total` steps (at least from step 3: compilation and capture come first)."""
        if step >= max(3, total // 10):
            self.start()
        if step >= max(4, total * 9 // 10):
            self.stop()


def run_fastcls(args, epochs: float, out: Path) -> dict:
    from transformers import AutoConfig

    from fastcls.components.callbacks import Callback
    from fastcls.components.host_memory import keep_freed_host_memory
    from fastcls.config import TrainConfig
    from fastcls.trainer import train as fastcls_train

    if not args.device.startswith("cuda"):
        keep_freed_host_memory()  # as `fastcls train` does
    settings = dict(FASTCLS_RUNS.get(args.worker, {}))
    if settings.get("freeze_layers") == "half":
        settings["freeze_layers"] = AutoConfig.from_pretrained(args.model).num_hidden_layers // 2
    cfg = TrainConfig(model=args.model, train=args.train, dev=args.dev, output=str(out), epochs=epochs,
                      batch_size=32, lr=5e-5, max_length=128, warmup=0.06, weight_decay=0.01, seed=args.seed,
                      device=args.device, log_every=50, **settings)
    busy = GpuBusy(args.device)

    class BusyWindow(Callback):
        def on_step_end(self, state):
            busy.window(state.step, state.total_steps)

        def on_train_end(self, state):
            busy.stop()

    result = fastcls_train(cfg, callbacks=[BusyWindow()] if busy.lib is not None else [])
    busy.stop()
    return {"samples_per_s": result.train_samples_per_s, "tokens_per_s": result.train_tokens_per_s,
            "train_s": result.train_seconds, "accuracy": result.best["accuracy"],
            "frozen": getattr(result, "frozen", None), "gpu_busy": busy.mean}


def run_hf(args, epochs: float, out: Path) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    def read(path):
        with open(path) as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def dataset(path):
        texts, labels = read(path)
        enc = tokenizer(texts, truncation=True, max_length=128)
        return [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(texts))]

    train_set, dev_set = dataset(args.train), dataset(args.dev)
    # fp32 master weights, as fastcls keeps: a bf16 checkpoint would otherwise load as a bf16 model
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=args.num_labels,
                                                               dtype=torch.float32)
    flags = {}
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if args.worker == "hf-best":
        flags = {"bf16": True, "optim": "adamw_torch_fused"}
        # transformers 5 renamed group_by_length to a sampling strategy
        flags.update({"group_by_length": True} if "group_by_length" in fields
                     else {"train_sampling_strategy": "group_by_length"})
    # older transformers take the warmup ratio separately; newer ones read a fraction in warmup_steps
    flags.update({"warmup_ratio": 0.06} if "warmup_ratio" in fields else {"warmup_steps": 0.06})
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=32, per_device_eval_batch_size=128,
        num_train_epochs=epochs, learning_rate=5e-5, weight_decay=0.01, seed=args.seed,
        save_strategy="no", report_to="none", logging_steps=50, disable_tqdm=True,
        use_cpu=args.device == "cpu", **flags,
    )
    busy = GpuBusy(args.device)

    class BusyWindow(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            busy.window(state.global_step, state.max_steps)

        def on_train_end(self, targs, state, control, **kwargs):
            busy.stop()

    trainer = Trainer(model=model, args=targs, train_dataset=train_set,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[BusyWindow()] if busy.lib is not None else None)
    metrics = trainer.train().metrics
    busy.stop()
    pred = trainer.predict(dev_set)
    accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    real_tokens = sum(len(row["input_ids"]) for row in train_set) * epochs
    return {"samples_per_s": metrics["train_samples_per_second"], "tokens_per_s": real_tokens / metrics["train_runtime"],
            "train_s": metrics["train_runtime"], "accuracy": accuracy, "frozen": None, "gpu_busy": busy.mean}


def worker(args) -> None:
    import torch

    start = time.perf_counter()
    epochs = run_epochs(args.worker, args.epochs, args.frozen_epochs)
    with tempfile.TemporaryDirectory() as tmp:
        runner = run_hf if args.worker in HF_RUNS else run_fastcls
        result = runner(args, epochs, Path(tmp) / "out")
    result.update(run=args.worker, epochs=epochs, wall_s=time.perf_counter() - start,
                  peak_mb=peak_memory_mb(args.device), device_name=device_name(args.device), torch=torch.__version__)
    print("RESULT " + json.dumps(result, default=str), flush=True)


def ratio_to_reference(row: dict, reference: dict | None) -> float | None:
    return row["samples_per_s"] / reference["samples_per_s"] if reference else None


def print_table(rows: list[dict], header: str, reference: dict | None, footnotes: list[str]) -> None:
    print(f"\n{header}")
    print(f"{'run':<28} {'epochs':>6} {'samples/s':>10} {'tokens/s':>10} {'train s':>8} {'peak MB':>9} "
          f"{'dev acc':>8} {'vs ' + REFERENCE_RUN:>10}")
    for r in rows:
        ratio = ratio_to_reference(r, reference)
        print(f"{r['run']:<28} {r['epochs']:>6g} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['train_s']:>8.1f} {r['peak_mb']:>9.0f} {r['accuracy']:>8.4f} "
              f"{'-' if ratio is None else f'{ratio:.2f}x':>10}")
    for r in rows:
        if r.get("frozen"):
            report = r["frozen"]
            text = ", ".join(f"{k}={v}" for k, v in report.items()) if isinstance(report, dict) else str(report)
            print(f"  {r['run']} frozen: {text}")
    busy = [f"{r['run']} {r['gpu_busy']:.0%}" for r in rows if r.get("gpu_busy") is not None]
    if busy:
        print(f"  GPU busy (NVML utilisation, 10-90% of the steps): {', '.join(busy)}")
    for note in footnotes:
        print(f"  note: {note}")


def draw_chart(rows: list[dict], path: str, title: str, reference: dict | None) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no chart written to {path} (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = [f"{r['run']} ({r['epochs']:g} ep)" for r in rows]
    speeds = [r["samples_per_s"] for r in rows]
    colors = ["tab:orange" if r["run"] in HF_RUNS else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.6))
    # numeric positions: a run named twice (a repeated pair, say) keeps a bar each
    bars = ax.barh(range(len(rows)), speeds, color=colors)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()  # first run on top, as in the table
    ax.set_xlabel("training samples/s (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(speeds) * 1.45)  # room for the annotations right of the longest bar
    for bar, r in zip(bars, rows, strict=True):
        ratio = ratio_to_reference(r, reference)
        ratio_text = f"{ratio:.2f}x {REFERENCE_RUN}" if ratio is not None else f"no {REFERENCE_RUN} run"
        ax.annotate(f"{r['samples_per_s']:.1f}/s  {ratio_text}  acc {r['accuracy']:.3f}",
                    (bar.get_width(), bar.get_y() + bar.get_height() / 2), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=8)
    groups = [("fastcls", "tab:blue"), ("HF Trainer", "tab:orange")]
    ax.legend(handles=[Patch(color=color, label=label) for label, color in groups if color in colors],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)  # outside the axes: never over a bar's text
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"chart written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=tuple(ENCODER_NAMES), default="minilm")
    parser.add_argument("--rows", type=int, default=None, help="training rows (default 4000 on the CPU, 16000 on CUDA)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--frozen-epochs", type=float, default=3.0,
                        help="epochs of the frozen runs and of fastcls-<N>ep, their full-training comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default=None,
                        help="encoder folder (default: bundled all-MiniLM-L6-v2); with --encoder bert-base, "
                             "the source of the vocabulary and tokenizer")
    parser.add_argument("--dataset", choices=("sst2", "agnews"), default="sst2",
                        help="SST-2 sentiment (2 labels, short phrases) or AG News topics (4 labels, longer texts)")
    parser.add_argument("--sst2", default=str(SHARED_DATA / "sst2"), help="folder with SST-2 train.tsv and dev.tsv")
    parser.add_argument("--agnews", default=str(SHARED_DATA / "agnews"),
                        help="folder with AG News train.csv and dev.csv")
    parser.add_argument("--runs", default=None, help=f"comma-separated, from {', '.join(known_runs(1, 3))} "
                             "(fastcls-<N>ep follows --frozen-epochs N), or all, or "
                             f"{', '.join(f'{name} ({sets})' for name, sets in RUN_SET_TEXT.items())}; "
                             f"default: all but {', '.join(SLOW_RUNS)} "
                             f"(and on the CPU {', '.join(CUDA_ONLY_RUNS)})")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run the default fastcls configuration from another checkout of fastcls (a git "
                             "worktree with its C++ extension built in place), right before each fastcls run: "
                             "the row fastcls-baseline")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--chart", help="also draw the table as a PNG bar chart here (needs matplotlib)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--dev", help=argparse.SUPPRESS)
    parser.add_argument("--num-labels", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows is not None and args.rows < 1:
        parser.error("--rows must be >= 1")
    if args.epochs <= 0 or args.frozen_epochs <= 0:
        parser.error("--epochs and --frozen-epochs must be > 0")
    if args.model is None:
        from fastcls.config import bundled_model_path

        args.model = bundled_model_path()
    if args.worker:
        worker(args)
        return

    names = known_runs(args.epochs, args.frozen_epochs)
    if args.runs is None:
        # the padding choice the default already makes on this device is not run twice
        same_as_default = "fastcls-unpadded" if args.device == "cpu" else "fastcls-padded"
        runs = [run for run in names if run not in SLOW_RUNS and run != same_as_default
                and not (run in CUDA_ONLY_RUNS and not args.device.startswith("cuda"))]
    elif args.runs in RUN_SETS:
        runs = list(RUN_SETS[args.runs])
    else:
        runs = names if args.runs == "all" else [run.strip() for run in args.runs.split(",") if run.strip()]
    unknown = [run for run in runs if run not in names and run != full_training_run(args.frozen_epochs)]
    if unknown or not runs:
        parser.error(f"--runs: unknown {unknown or 'empty list'}; known: {', '.join(names)} "
                     f"(fastcls-<N>ep follows --frozen-epochs N)")
    rows_wanted = args.rows or (16000 if args.device.startswith("cuda") else 4000)

    def stop(signum, frame):
        raise Stopped

    signal.signal(signal.SIGTERM, stop)
    if args.json:  # no stale rows from an earlier invocation, should this one finish none
        Path(args.json).write_text("[]")
    rows, failed, stopped, row_count = [], [], None, 0
    with tempfile.TemporaryDirectory(prefix="fastcls_e2e_") as tmp:
        try:
            train, dev, row_count, num_labels = write_train_rows(args.dataset, Path(getattr(args, args.dataset)),
                                                                 rows_wanted, Path(tmp))
            model = args.model
            if args.encoder == "bert-base":
                print("== building the BERT-base-sized encoder", file=sys.stderr, flush=True)
                model = str(build_bert_base(Path(args.model), Path(tmp) / "bert-base", args.seed))
            schedule = [(run, None) for run in runs]
            if args.baseline:
                at = runs.index("fastcls") if "fastcls" in runs else 0
                schedule.insert(at, (BASELINE_RUN, Path(args.baseline).resolve()))
            for i, (run, checkout) in enumerate(schedule, 1):
                script, env = __file__, None
                if checkout is not None:  # that checkout's own worker, importing that checkout's fastcls
                    script, env = str(checkout / "benchmarks" / "e2e.py"), {**os.environ, "PYTHONPATH": str(checkout)}
                cmd = [sys.executable, script, "--worker", "fastcls" if checkout else run, "--epochs", str(args.epochs),
                       "--frozen-epochs", str(args.frozen_epochs), "--device", args.device, "--seed", str(args.seed),
                       "--model", model, "--train", str(train), "--dev", str(dev),
                       *(["--num-labels", str(num_labels)] if run in HF_RUNS else [])]
                print(f"== {run} ({i}/{len(schedule)})", file=sys.stderr, flush=True)
                proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    # one broken configuration must not cost the others their rows
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                    print(f"   run {run} failed (exit {proc.returncode})", file=sys.stderr, flush=True)
                    failed.append(run)
                    continue
                row = {**json.loads(lines[-1][len("RESULT "):]), "run": run}
                rows.append(row)
                print(f"   {row['samples_per_s']:.1f} samples/s, {row['train_s']:.1f} s training, "
                      f"{row['wall_s']:.1f} s in all, dev acc {row['accuracy']:.4f}", file=sys.stderr, flush=True)
                if args.json:  # after every run, so that a run cut short still leaves the ones before it
                    Path(args.json).write_text(json.dumps(rows, indent=2))
        except Stopped:
            stopped = f"stopped by SIGTERM: {len(runs) - len(rows) - len(failed)} of {len(runs)} runs not measured"
            print(stopped, file=sys.stderr, flush=True)
    if not rows:
        sys.exit("no run finished" + (f" (failed: {', '.join(failed)})" if failed else ""))

    reference = next((r for r in rows if r["run"] == REFERENCE_RUN), None)
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = rows[0]["device_name"]
    header = (f"{ENCODER_NAMES[args.encoder]}, first {row_count} {DATASET_NAMES[args.dataset]} rows, batch 32, max length 128, "
              f"{args.device}\n{machine}; torch {rows[0]['torch']}; {date}")
    footnotes = []
    if reference is None:
        footnotes.append(f"no {REFERENCE_RUN} run, so no ratios")
    elif any(r["epochs"] != reference["epochs"] for r in rows):
        footnotes.append(f"ratios compare samples/s across epoch counts: {REFERENCE_RUN} ran "
                         f"{reference['epochs']:g} epoch(s); the frozen cache only pays from the second epoch")
    if args.encoder == "bert-base":
        footnotes.append("randomly initialised encoder: dev accuracy is near chance (about 0.5) and compares "
                         "nothing; the rows measure speed and memory at BERT-base's size")
    if failed:
        footnotes.append(f"failed, no row: {', '.join(failed)} (their output went to stderr)")
    if stopped:
        footnotes.append(stopped)
    print_table(rows, header, reference, footnotes)
    if args.chart:
        accuracy_note = "; dev accuracy near chance (random init)" if args.encoder == "bert-base" else ""
        title = (f"{ENCODER_NAMES[args.encoder]}, {row_count} {DATASET_NAMES[args.dataset]} rows, batch 32, {args.device}: {machine}\n"
                 f"torch {rows[0]['torch']}, {date}{accuracy_note}")
        draw_chart(rows, args.chart, title, reference)
    if stopped or failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
