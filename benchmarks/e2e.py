"""End to end: fine-tune MiniLM with fastcls and with the Hugging Face Trainer, side by side, one machine.

    python benchmarks/e2e.py [--rows 4000] [--epochs 1] [--device cpu] [--runs fastcls,hf-defaults,hf-best]

Every run: the first --rows SST-2 training rows, batch 32, lr 5e-5, max length 128, 6% warmup, weight
decay 0.01, evaluated on the SST-2 dev set. Each run is its own process, so its peak RSS (CPU) or peak
allocated memory (CUDA) is its own. Prints one table with the ratios to the Trainer's best flags.
"""
import argparse
import csv
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_SST2 = ROOT.parent / "shared" / "data" / "sst2"  # ../shared/data/sst2 beside the project root
RUNS = ("fastcls", "fastcls-fp32", "hf-defaults", "hf-best")


def sst2_files(sst2: Path, rows: int, workdir: Path) -> tuple[Path, Path]:
    if not (sst2 / "train.tsv").is_file():
        sys.exit(f"SST-2 not found at {sst2} (pass --sst2 DIR holding train.tsv and dev.tsv)")
    train = workdir / f"sst2_train_{rows}.tsv"
    with open(sst2 / "train.tsv") as src, open(train, "w") as dst:
        for i, line in enumerate(src):
            if i > rows:
                break
            dst.write(line)
    return train, sst2 / "dev.tsv"


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_fastcls(args, train: Path, dev: Path, out: Path, precision: str) -> dict:
    from fastcls.config import TrainConfig
    from fastcls.train import train as fastcls_train

    cfg = TrainConfig(model=args.model, train=str(train), dev=str(dev), output=str(out), epochs=args.epochs,
                      batch_size=32, lr=5e-5, max_length=128, warmup=0.06, weight_decay=0.01, seed=args.seed,
                      device=args.device, precision=precision, log_every=50)
    result = fastcls_train(cfg)
    return {"samples_per_s": result.train_samples_per_s, "train_s": result.train_seconds,
            "accuracy": result.best["accuracy"]}


def run_hf(args, train: Path, dev: Path, out: Path, best_flags: bool) -> dict:
    import numpy as np
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
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

    train_set, dev_set = dataset(train), dataset(dev)
    # fp32 master weights, as fastcls keeps: a bf16 checkpoint would otherwise load as a bf16 model
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2, dtype=torch.float32)
    flags = {}
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if best_flags:
        flags = {"bf16": True, "optim": "adamw_torch_fused"}
        # transformers 5 renamed group_by_length to a sampling strategy
        flags.update({"group_by_length": True} if "group_by_length" in fields
                     else {"train_sampling_strategy": "group_by_length"})
    # older transformers take the warmup ratio separately; newer ones read a fraction in warmup_steps
    flags.update({"warmup_ratio": 0.06} if "warmup_ratio" in fields else {"warmup_steps": 0.06})
    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=32, per_device_eval_batch_size=128,
        num_train_epochs=args.epochs, learning_rate=5e-5, weight_decay=0.01, seed=args.seed,
        save_strategy="no", report_to="none", logging_steps=50, disable_tqdm=True,
        use_cpu=args.device == "cpu", **flags,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer))
    metrics = trainer.train().metrics
    pred = trainer.predict(dev_set)
    accuracy = float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())
    return {"samples_per_s": metrics["train_samples_per_second"], "train_s": metrics["train_runtime"],
            "accuracy": accuracy}


def worker(args) -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, dev = sst2_files(Path(args.sst2), args.rows, tmp)
        if args.worker.startswith("fastcls"):
            precision = "fp32" if args.worker == "fastcls-fp32" else "auto"
            result = run_fastcls(args, train, dev, tmp / "out", precision)
        else:
            result = run_hf(args, train, dev, tmp / "out", best_flags=args.worker == "hf-best")
    result.update(run=args.worker, wall_s=time.perf_counter() - start, peak_mb=peak_memory_mb(args.device))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default=None, help="encoder folder (default: bundled all-MiniLM-L6-v2)")
    parser.add_argument("--sst2", default=str(SHARED_SST2), help="folder with SST-2 train.tsv and dev.tsv")
    parser.add_argument("--runs", default="fastcls,hf-defaults,hf-best")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from fastcls.config import bundled_model_path

        args.model = bundled_model_path()
    if args.worker:
        worker(args)
        return

    rows = []
    for run in args.runs.split(","):
        cmd = [sys.executable, __file__, "--worker", run, "--rows", str(args.rows), "--epochs", str(args.epochs),
               "--device", args.device, "--seed", str(args.seed), "--model", args.model, "--sst2", args.sst2]
        print(f"== {run}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            sys.exit(f"run {run} failed (exit {proc.returncode})")
        rows.append(json.loads(lines[-1][len("RESULT "):]))

    reference = next((r for r in rows if r["run"] == "hf-best"), rows[-1])
    print(f"\nMiniLM, first {args.rows} SST-2 rows, {args.epochs:g} epoch(s), batch 32, max length 128, {args.device}")
    print(f"{'run':<14} {'samples/s':>10} {'train s':>8} {'wall s':>8} {'peak MB':>9} {'dev acc':>8} {'vs hf-best':>10}")
    for r in rows:
        print(f"{r['run']:<14} {r['samples_per_s']:>10.1f} {r['train_s']:>8.1f} {r['wall_s']:>8.1f} "
              f"{r['peak_mb']:>9.0f} {r['accuracy']:>8.4f} {r['samples_per_s'] / reference['samples_per_s']:>9.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
