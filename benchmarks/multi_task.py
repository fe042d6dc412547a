"""Multi-task against single-task on real data: SST-2 (sentiment) and AG News (topic) as two tasks of one model.

    python benchmarks/multi_task.py [--sst2-rows N] [--agnews-rows N] [--epochs 1] [--seeds 0,1,2]
                                    [--step-repeats 30] [--json FILE]

Two measurements, each printed as a table:

1. Accuracy and throughput. For each seed: the two-task run (`--task sst2=... --task agnews=...`, proportional
   sampling, default weights 1/2 each) and each task's single-task run at the same budget (1 epoch of the same
   rows, batch 32, lr 5e-5, the bundled MiniLM); each task's dev accuracy (mean and spread over the seeds), and
   the two-task run's training samples/s against the sum of the single runs' (rows of both / seconds of both).
2. The step. The same batch of 32 rows (half SST-2, half AG News, fixed), a training step (forward, backward,
   optimizer) of the single-task model against the two-task model, alternated A/B over --step-repeats steps
   after warm-up; the ratio of the medians (and of the fastest steps, the least disturbed on a shared machine)
   must stay under 1.1: the encoder runs once for both heads.

The CPU is shared and noisy: compare within one invocation only.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SST2, AGNEWS = DATA / "sst2", DATA / "agnews"


def _subset(source: Path, rows: int | None, out: Path) -> Path:
    """The first `rows` data rows of a TSV/CSV file (header kept), or the file itself."""
    if rows is None:
        return source
    import csv

    delimiter = "\t" if source.suffix == ".tsv" else ","
    with open(source, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
        lines = [next(reader)] + [row for _, row in zip(range(rows), reader)]
    with open(out, "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
                            escapechar="\\" if delimiter == "\t" else None)
        writer.writerows(lines)
    return out


def _accuracy_runs(args, tmp: Path) -> dict:
    import fastcls

    sst2 = _subset(SST2 / "train.tsv", args.sst2_rows, tmp / "sst2.tsv")
    agnews = _subset(AGNEWS / "train.csv", args.agnews_rows, tmp / "agnews.csv")
    common = dict(epochs=args.epochs, batch_size=32, lr=5e-5, max_length=128, eval_batch_size=256,
                  log_every=50, overwrite=True)
    results = {"two-task": [], "sst2": [], "agnews": []}
    for seed in args.seeds:
        runs = {
            "two-task": dict(tasks=[f"sst2={sst2},{SST2 / 'dev.tsv'}", f"agnews={agnews},{AGNEWS / 'dev.csv'}"]),
            "sst2": dict(train=str(sst2), dev=str(SST2 / "dev.tsv")),
            "agnews": dict(train=str(agnews), dev=str(AGNEWS / "dev.csv")),
        }
        for name, data in runs.items():
            result = fastcls.train(output=str(tmp / f"{name}-{seed}"), seed=seed, **common, **data)
            best = result.best
            results[name].append({
                "seed": seed, "rows": round(result.train_samples_per_s * result.train_seconds),
                "seconds": result.train_seconds, "samples_per_s": result.train_samples_per_s,
                "sst2": best.get("sst2/accuracy", best["accuracy"] if name == "sst2" else None),
                "agnews": best.get("agnews/accuracy", best["accuracy"] if name == "agnews" else None)})
            print(f"seed {seed} {name}: {results[name][-1]}", flush=True)
    return results


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _print_accuracy(results: dict) -> None:
    print("\n| run | SST-2 dev acc | AG News dev acc | train samples/s |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        cells = [_mean_spread([r[task] for r in runs]) if runs[0][task] is not None else "-" for task in ("sst2",
                                                                                                        "agnews")]
        print(f"| {name} | {cells[0]} | {cells[1]} | {_mean_spread([r['samples_per_s'] for r in runs])} |")
    single = [(a["rows"] + b["rows"]) / (a["seconds"] + b["seconds"])
              for a, b in zip(results["sst2"], results["agnews"], strict=True)]
    ratio = [t["samples_per_s"] / s for t, s in zip(results["two-task"], single, strict=True)]
    print(f"\ntwo-task samples/s against the two single-task runs together: {_mean_spread(ratio)}x")


def _step_ratio(repeats: int) -> dict:
    """Median step time of the two-task model over the single-task model's on one fixed batch."""
    from fastcls.components.optimizer import OptimizerConfig, build_optimizer, param_groups
    from fastcls.config import bundled_model_path
    from fastcls.data import collate, read_examples, tokenize_examples
    from fastcls.data.collate import IGNORED_LABEL
    from fastcls.models.classifier import EncoderClassifier, Tasks
    from fastcls.models.loading import load_encoder, load_tokenizer

    tokenizer = load_tokenizer(bundled_model_path())
    sst2 = read_examples(SST2 / "dev.tsv")[:16]
    agnews = read_examples(AGNEWS / "dev.csv")[:16]
    encoded = tokenize_examples(sst2 + agnews, tokenizer, 128)
    single_labels = torch.tensor([int(e.label) for e in sst2] + [int(e.label) % 2 for e in agnews])
    task_labels = torch.full((32, 2), IGNORED_LABEL)
    task_labels[:16, 0] = torch.tensor([int(e.label) for e in sst2])
    task_labels[16:, 1] = torch.tensor([int(e.label) - 1 for e in agnews])

    def setup(tasks):
        torch.manual_seed(0)
        model = EncoderClassifier(load_encoder(bundled_model_path()), 2, 0.1, packed=True, tasks=tasks).train()
        optimizer = build_optimizer(param_groups(model, 0.01), OptimizerConfig())
        batch = collate(encoded, range(32), packed=True, labels=False)
        import dataclasses

        batch = dataclasses.replace(batch, labels=task_labels if tasks else single_labels)
        return model, optimizer, batch

    models = {"single": setup(None), "two-task": setup(Tasks(["sst2", "agnews"], [2, 4]))}
    times = {name: [] for name in models}
    for i in range(repeats + 5):
        for name, (model, optimizer, batch) in models.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = model(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= 5:  # warm-up steps are not timed
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    fastest = {name: min(t) for name, t in times.items()}  # the least disturbed by other processes
    return {"single_ms": medians["single"] * 1e3, "two_task_ms": medians["two-task"] * 1e3,
            "ratio": medians["two-task"] / medians["single"], "ratio_of_fastest": fastest["two-task"] / fastest["single"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sst2-rows", type=int, default=None, help="default: all 67,349")
    parser.add_argument("--agnews-rows", type=int, default=None, help="default: all 6,333")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--step-repeats", type=int, default=30)
    parser.add_argument("--skip-accuracy", action="store_true", help="the step measurement only")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    if not (SST2.is_dir() and AGNEWS.is_dir()):
        sys.exit(f"benchmarks/multi_task.py: needs {SST2} and {AGNEWS} (the shared real data)")
    torch.set_num_threads(torch.get_num_threads())
    figures = {"machine": f"{torch.get_num_threads()} threads, torch {torch.__version__}"}
    step = _step_ratio(args.step_repeats)
    figures["step"] = step
    print(f"step on one batch of 32 rows, bf16 autocast: single-task {step['single_ms']:.1f} ms, two-task "
          f"{step['two_task_ms']:.1f} ms (medians), ratio {step['ratio']:.3f}, of the fastest steps "
          f"{step['ratio_of_fastest']:.3f} (bar: < 1.1)", flush=True)
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            figures["runs"] = _accuracy_runs(args, Path(tmp))
        _print_accuracy(figures["runs"])
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
