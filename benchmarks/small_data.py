"""Small-data accuracy: what EDA augmentation and the few-sample recipes gain on real data, against plain fastcls
and the Hugging Face Trainer at the same budget.

    python benchmarks/small_data.py [--datasets sst2,agnews] [--sizes 500,2000] [--seeds 0,1,2]
                                    [--runs plain,eda-fixed,...] [--jobs 2] [--results FILE.jsonl] [--table]

For each data set, training size N and seed: N training rows drawn at random (the draw depends on the seed and N
only, so every run of a seed trains on the same rows), the bundled MiniLM, batch 32, lr 5e-5, max length 128,
6% warmup, weight decay 0.01, bf16 autocast, evaluated once at the end on the whole dev set (no checkpoint chosen
on dev). The budget is the number of training samples seen, the same for every run: `BUDGET_EPOCHS[N]` passes
over the N rows (or `--passes`); EDA runs, whose epoch holds each row and its `num_aug` copies, see as many
samples in fewer passes. Each run is its own process with `--threads` threads; `--jobs` run side by side.

Results go to `--results` (JSON lines, one run each); runs already there are skipped, so that an interrupted
invocation continues, new runs can be added later and invocations can share the work side by side. The table
gives each run's dev accuracy as mean ± standard deviation over the seeds, its difference from `plain`, and its
training samples/s (only comparable within one invocation on a quiet machine).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = {"sst2": (DATA / "sst2" / "train.tsv", DATA / "sst2" / "dev.tsv"),
            "agnews": (DATA / "agnews" / "train.csv", DATA / "agnews" / "dev.csv")}
BUDGET_EPOCHS = {500: 6.0, 2000: 2.0}  # passes over the N original rows; other sizes: 2
COMMON = dict(batch_size=32, lr=5e-5, max_length=128, warmup=0.06, weight_decay=0.01, precision="bf16",
              eval_batch_size=128, log_every=1000)
# what each fastcls run sets on TrainConfig
RUNS = {
    "plain": {},
    "eda-fixed": {"augment": "eda", "augment_copies": "fixed"},
    "eda-fresh": {"augment": "eda", "augment_copies": "fresh"},
    "llrd": {"layer_lr_decay": 0.9},
    "llrd-reinit": {"layer_lr_decay": 0.9, "reinit_layers": 1},
    "mean": {"pooling": "mean"},
    "hf": None,  # the Trainer's best flags: bf16, fused AdamW, length-grouped batches
}


def draw_rows(dataset: str, size: int, seed: int, out: Path) -> Path:
    """N random data rows of the training file (header kept), written as the same format."""
    import numpy as np

    source = DATASETS[dataset][0]
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    header, body = lines[0], lines[1:]
    if source.suffix == ".csv":  # quoted fields may span lines: split records with the csv module
        import csv
        import io

        records = list(csv.reader(io.StringIO("".join(body))))
        picked = np.random.default_rng([seed, size]).choice(len(records), size, replace=False)
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(records[i] for i in sorted(picked))
        out.write_text(header + buffer.getvalue(), encoding="utf-8")
        return out
    picked = np.random.default_rng([seed, size]).choice(len(body), size, replace=False)
    out.write_text(header + "".join(body[i] for i in sorted(picked)), encoding="utf-8")
    return out


def run_fastcls(run: str, train: Path, dev: Path, epochs: float, seed: int, out: Path) -> dict:
    import fastcls

    settings = dict(RUNS[run])
    if settings.get("augment") == "eda":  # the same samples seen: each pass holds the row and its copies
        from fastcls.augment import EdaConfig

        epochs /= 1 + EdaConfig().num_aug
    # one evaluation, at the end: every run is judged on its last step, as the Trainer's is
    result = fastcls.train(train=str(train), dev=str(dev), output=str(out), epochs=epochs, seed=seed,
                           eval_every=10**9, **COMMON, **settings)
    return {"accuracy": result.best["accuracy"], "macro_f1": result.best["macro_f1"], "steps": result.steps,
            "samples_per_s": result.train_samples_per_s, "train_s": result.train_seconds}


def run_hf(train: Path, dev: Path, epochs: float, seed: int, out: Path) -> dict:
    import dataclasses

    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from fastcls.config import bundled_model_path
    from fastcls.data import LabelMap, read_examples

    model_path = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_rows, dev_rows = read_examples(train), read_examples(dev)  # the texts exactly as fastcls reads them
    labels = LabelMap.from_labels([row.label for row in train_rows])

    def dataset(rows):
        enc = tokenizer([row.texts[0] for row in rows], truncation=True, max_length=COMMON["max_length"])
        return [{**{k: v[i] for k, v in enc.items()}, "labels": labels.encode(row.label)} for i, row in enumerate(rows)]

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(labels),
                                                               dtype=torch.float32)
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    flags = {"bf16": True, "optim": "adamw_torch_fused"}
    flags.update({"group_by_length": True} if "group_by_length" in fields
                 else {"train_sampling_strategy": "group_by_length"})
    flags.update({"warmup_ratio": COMMON["warmup"]} if "warmup_ratio" in fields else {"warmup_steps": COMMON["warmup"]})
    targs = TrainingArguments(output_dir=str(out), per_device_train_batch_size=COMMON["batch_size"],
                              per_device_eval_batch_size=COMMON["eval_batch_size"], num_train_epochs=epochs,
                              learning_rate=COMMON["lr"], weight_decay=COMMON["weight_decay"], seed=seed,
                              save_strategy="no", report_to="none", logging_steps=1000, disable_tqdm=True,
                              use_cpu=True, **flags)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset(train_rows),
                      data_collator=DataCollatorWithPadding(tokenizer))
    metrics = trainer.train().metrics
    pred = trainer.predict(dataset(dev_rows))
    predicted = np.argmax(pred.predictions, -1)
    from sklearn.metrics import f1_score

    return {"accuracy": float((predicted == pred.label_ids).mean()),
            "macro_f1": float(f1_score(pred.label_ids, predicted, average="macro")),
            "steps": trainer.state.global_step, "samples_per_s": metrics["train_samples_per_second"],
            "train_s": metrics["train_runtime"]}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    size, seed = args.size, args.seed
    epochs = args.passes or BUDGET_EPOCHS.get(size, 2.0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train = draw_rows(args.dataset, size, seed, Path(tmp) / f"train{DATASETS[args.dataset][0].suffix}")
        dev = DATASETS[args.dataset][1]
        if args.worker == "hf":
            result = run_hf(train, dev, epochs, seed, Path(tmp) / "out")
        else:
            result = run_fastcls(args.worker, train, dev, epochs, seed, Path(tmp) / "out")
    result.update(run=args.worker, dataset=args.dataset, size=size, seed=seed, threads=args.threads, passes=epochs,
                  wall_s=time.perf_counter() - start)
    print("RESULT " + json.dumps(result), flush=True)


def key(row: dict) -> tuple:
    return row["dataset"], row["size"], row["run"], row["seed"]


def read_results(results: Path) -> dict:
    """The runs on record, by key; the first of any run recorded twice (by invocations side by side)."""
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    kept = {}
    for row in rows:
        kept.setdefault(key(row), row)
    return kept


def launch(job: tuple, threads: int, results: Path, passes: float | None) -> None:
    dataset, size, run, seed = job
    if job in read_results(results):  # another invocation side by side ran it meanwhile
        return
    command = [sys.executable, __file__, "--worker", run, "--dataset", dataset, "--size", str(size),
               "--seed", str(seed), "--threads", str(threads)] + (["--passes", str(passes)] if passes else [])
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        print(f"FAILED {job}:\n{done.stderr[-3000:]}", flush=True)
        return
    row = json.loads(lines[-1][len("RESULT "):])
    with results.open("a") as f:  # one short write per line: safe from the pool's threads
        f.write(json.dumps(row) + "\n")
    print(f"{dataset} N={size} {run} seed {seed}: accuracy {row['accuracy']:.4f}, {row['samples_per_s']:.1f} "
          f"samples/s, {row['wall_s']:.0f} s", flush=True)


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def print_table(rows: list[dict], runs: list[str]) -> None:
    print("| data | N | run | dev accuracy | vs plain | macro-F1 | samples/s | seeds |")
    print("|---|---:|---|---|---:|---|---:|---:|")
    groups = sorted({(r["dataset"], r["size"]) for r in rows}, key=lambda g: (list(DATASETS).index(g[0]), g[1]))
    for dataset, size in groups:
        by_run = {run: sorted((r for r in rows if (r["dataset"], r["size"], r["run"]) == (dataset, size, run)),
                              key=lambda r: r["seed"]) for run in runs}
        plain = {r["seed"]: r["accuracy"] for r in by_run.get("plain", [])}
        for run, got in by_run.items():
            if not got:
                continue
            gains = [r["accuracy"] - plain[r["seed"]] for r in got if r["seed"] in plain]
            gain = f"{statistics.mean(gains) * 100:+.2f}" if gains and run != "plain" else ""
            print(f"| {dataset} | {size} | {run} | {mean_sd([r['accuracy'] for r in got])} | {gain} | "
                  f"{mean_sd([r['macro_f1'] for r in got])} | {statistics.mean(r['samples_per_s'] for r in got):.0f} "
                  f"| {len(got)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    listed = lambda s: s.split(",")  # noqa: E731
    parser.add_argument("--datasets", type=listed, default=list(DATASETS))
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=list(BUDGET_EPOCHS))
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--runs", type=listed, default=list(RUNS))
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--results", type=Path, default=Path("small_data_results.jsonl"))
    parser.add_argument("--passes", type=float,
                        help="the budget in passes over the N rows for every size (default: BUDGET_EPOCHS); give "
                             "each budget its own --results")
    parser.add_argument("--table", action="store_true", help="print the table of --results only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    unknown = sorted(set(args.runs) - set(RUNS)) + sorted(set(args.datasets) - set(DATASETS))
    if unknown:
        sys.exit(f"benchmarks/small_data.py: unknown runs or data sets {unknown}; runs: {', '.join(RUNS)}")
    missing = [str(path) for name in args.datasets for path in DATASETS[name] if not path.is_file()]
    if missing:
        sys.exit(f"benchmarks/small_data.py: needs the shared real data; missing {', '.join(missing)}")
    done = set(read_results(args.results))
    if not args.table:
        # seeds outermost: a partial invocation still covers every run of its first seeds
        jobs = [(d, n, run, s) for s in args.seeds for d in args.datasets for n in args.sizes for run in args.runs
                if (d, n, run, s) not in done]
        print(f"{len(jobs)} runs to do ({len(done)} already in {args.results})", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: launch(job, args.threads, args.results, args.passes), jobs))
    rows = list(read_results(args.results).values())
    print_table([r for r in rows if r["dataset"] in args.datasets and r["size"] in args.sizes], args.runs)


if __name__ == "__main__":
    main()
