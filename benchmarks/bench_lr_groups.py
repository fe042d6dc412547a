"""FusedAdamW's step with layer-wise lr decay's groups against the usual two: one launch per group, so the bundled
all-MiniLM-L6-v2 classifier's step runs over 2 groups (`--layer-lr-decay 1`) or 16 (6 layers, the embeddings and
the head, each decayed and not), on the same parameters and gradients, interleaved in one process.

    python benchmarks/bench_lr_groups.py [--device cpu|cuda] [--steps N] [--repeats N]

Prints the median milliseconds of one step for each, and their ratio.
"""
import argparse
import copy
import statistics
import time

import torch

from fastcls.components.optimizer import OptimizerConfig, build_optimizer, param_groups
from fastcls.config import bundled_model_path
from fastcls.models.classifier import EncoderClassifier
from fastcls.models.loading import load_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    base = EncoderClassifier(load_encoder(bundled_model_path()), 2, 0.1).to(device)
    runs = {}
    for xi in (1.0, 0.9):
        model = copy.deepcopy(base)
        torch.manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        groups = param_groups(model, 0.01, 5e-5, xi)
        runs[xi] = (build_optimizer(groups, OptimizerConfig(lr=5e-5)), len(groups), [])
    for optimizer, _, _ in runs.values():  # address tables and state built outside the timing
        optimizer.step()
    for _ in range(args.repeats):
        for optimizer, _, times in runs.values():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) / args.steps * 1e3)
    medians = {xi: statistics.median(times) for xi, (_, _, times) in runs.items()}
    for xi, (_, count, _) in runs.items():
        print(f"--layer-lr-decay {xi:g}: {count} groups, {medians[xi]:.2f} ms per step")
    print(f"ratio {medians[0.9] / medians[1.0]:.3f}")


if __name__ == "__main__":
    main()
