"""The fused multi-task head against plain PyTorch heads: one table, ratios measured in the same run.

    python benchmarks/bench_multi_task_head.py [--device cpu|cuda] [--json FILE] [--reps N] [--threads N]

Each row times one training step of the heads, forward + backward (gradients for h_CLS, the head weights and
biases), over interleaved repetitions: the median, and the fastest repetition, which a shared, noisy machine
(another process taking a core in the middle of a multi-threaded op) disturbs least:

- fastcls: `multi_task_head` (dropout, one product over the concatenated weights, one multi-task cross-entropy
  launch), task_scale = alpha_t / n_t computed from the batch's labels inside the step;
- torch: T nn.Linear heads, nn.Dropout, and F.cross_entropy(ignore_index=-100) per task, summed with alpha_t.

Both compute the same loss (checked before timing): alpha_t times task t's mean over its labelled rows. 20% of the
labels are missing; dropout 0.1. Layout "shared": one h_CLS [B, d] for every task; "per-task": h_CLS [T, B, d]
(task-specific top layers). "speedup" is torch's time over fastcls's. Part of the gap at B = 256 is dropout:
nn.Dropout draws and stores a mask, fastcls's mask-free dropout draws it from a counter.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cross_entropy import interleaved_times

from fastcls.ops import multi_task_head

BATCHES = (32, 256)
DIMS = (384, 768)
NUM_LABELS = ([2, 4], [2, 4, 10, 3])
LAYOUTS = ("shared", "per-task")
DROPOUT = 0.1
MISSING = 0.2


class TorchHeads(nn.Module):
    """The plain alternative: one nn.Linear per task, the weights of the fused head's rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, num_labels: list[int]):
        super().__init__()
        self.dropout = nn.Dropout(DROPOUT)
        self.heads = nn.ModuleList(nn.Linear(weight.shape[1], k) for k in num_labels)
        with torch.no_grad():
            for head, w, b in zip(self.heads, weight.split(num_labels), bias.split(num_labels)):
                head.weight.copy_(w)
                head.bias.copy_(b)

    def forward(self, h, targets, alpha):
        dropped = self.dropout(h)
        return sum(alpha[t] * F.cross_entropy(head(dropped if h.ndim == 2 else dropped[t]), targets[:, t])
                   for t, head in enumerate(self.heads))


def case(layout: str, n_rows: int, dim: int, num_labels: list[int], device: torch.device):
    generator = torch.Generator().manual_seed(0)
    shape = (n_rows, dim) if layout == "shared" else (len(num_labels), n_rows, dim)
    h = torch.randn(shape, generator=generator).to(device).requires_grad_()
    weight = (torch.randn(sum(num_labels), dim, generator=generator) * dim**-0.5).to(device).requires_grad_()
    bias = torch.zeros(sum(num_labels), device=device).requires_grad_()
    targets = torch.stack([torch.randint(0, k, (n_rows,), generator=generator) for k in num_labels], dim=1)
    targets[torch.rand(targets.shape, generator=generator) < MISSING] = -100
    targets[0] = 0  # every task has a labelled row
    alpha = torch.full((len(num_labels),), 1 / len(num_labels), device=device)
    return h, weight, bias, targets.to(device), alpha


def fused_loss(h, weight, bias, targets, num_labels, alpha, training=True):
    task_scale = alpha / (targets != -100).sum(0).clamp(min=1)
    loss, _, _ = multi_task_head(h, weight, bias, targets, num_labels, task_scale, dropout_p=DROPOUT,
                                 training=training, validate=False)
    return loss


def rows(device: torch.device, reps: int) -> list[dict]:
    results = []
    for layout in LAYOUTS:
        for num_labels in NUM_LABELS:
            for n_rows in BATCHES:
                for dim in DIMS:
                    h, weight, bias, targets, alpha = case(layout, n_rows, dim, num_labels, device)
                    heads = TorchHeads(weight.detach(), bias.detach(), num_labels).to(device)
                    # the same loss without dropout, before anything is timed
                    fused = fused_loss(h, weight, bias, targets, num_labels, alpha, training=False)
                    plain = heads.eval()(h, targets, alpha)
                    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
                    heads.train()

                    def fastcls_step(h=h, weight=weight, bias=bias, targets=targets, num_labels=num_labels,
                                     alpha=alpha):
                        h.grad = weight.grad = bias.grad = None
                        fused_loss(h, weight, bias, targets, num_labels, alpha).backward()

                    def torch_step(heads=heads, h=h, targets=targets, alpha=alpha):
                        h.grad = None
                        heads.zero_grad(set_to_none=True)
                        heads(h, targets, alpha).backward()

                    times = interleaved_times({"fastcls": fastcls_step, "torch": torch_step}, device, reps)
                    row = {"layout": layout, "batch": n_rows, "dim": dim, "num_labels": num_labels}
                    for stat, reduce in (("median", statistics.median), ("min", min)):
                        fastcls_us, torch_us = (reduce(times[impl]) * 1e6 for impl in ("fastcls", "torch"))
                        row.update({f"fastcls_{stat}_us": fastcls_us, f"torch_{stat}_us": torch_us,
                                    f"speedup_{stat}": torch_us / fastcls_us})
                    results.append(row)
    return results


def print_table(device_name: str, results: list[dict]) -> None:
    print(f"# {device_name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: forward + backward, us")
    print("| layout | B | d | num_labels | fastcls median | torch median | speedup | fastcls min | torch min | "
          "speedup (min) |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        print(f"| {row['layout']} | {row['batch']} | {row['dim']} | {row['num_labels']} "
              f"| {row['fastcls_median_us']:.0f} | {row['torch_median_us']:.0f} | {row['speedup_median']:.2f}x "
              f"| {row['fastcls_min_us']:.0f} | {row['torch_min_us']:.0f} | {row['speedup_min']:.2f}x |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--reps", type=int, default=200, help="timed repetitions per case")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    device_name = f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name()
    results = rows(device, args.reps)
    print_table(device_name, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
