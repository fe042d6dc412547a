"""Task-specific layers (`--task-layers K`) run batched across tasks against a Python loop over tasks, each task's
copy run through LayerwiseEncoder's layer code: `TaskLayers.batched` True against False.

    python benchmarks/bench_task_layers.py [--device cpu|cuda] [--reps N] [--dtype fp32|bf16] [--threads N]

MiniLM-sized random BERT layers (d = 384, 12 heads, FFN 1536), 32 unpadded rows of 20 to 40 tokens (about 30),
T = 2 and 3 tasks, K = 1 and 2 task layers. Rows: median milliseconds of a training forward + backward (dropout
0.1, the gradient of a random weighting of the [T, rows, d] output w.r.t. the input and every copy's parameters)
and of an evaluation forward (no grad), loop vs batched, interleaved rep by rep so that a noisy shared machine
disturbs both alike; on a shared CPU the fastest rep (min) is the steadier figure, so both are printed.
`--cpu-time`: the process's CPU time instead of wall time (with --threads 1, the work done whatever else runs on
the machine).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.data import Encoded, collate
from fastcls.models.task_layers import TaskLayers


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None, help="torch's CPU threads (default: torch's choice)")
    parser.add_argument("--cpu-time", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_host_memory()
    autocast = args.dtype == "bf16"
    clock = time.process_time if args.cpu_time else time.perf_counter
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 41, size=32)
    encoded = Encoded(input_ids=rng.integers(2, 99, size=int(lengths.sum())).astype(np.int32), lengths=lengths,
                      token_type_ids=None, labels=np.zeros(32, dtype=np.int64), num_truncated=0, max_length=64)
    batch = collate(encoded, range(32), packed=True).to(device)
    print(f"{device} {args.dtype}, {torch.get_num_threads()} threads, {'CPU' if args.cpu_time else 'wall'} time, "
          f"32 rows, {batch.num_tokens} tokens (max {batch.max_len}), {args.reps} reps")
    print("| T | K | mode | loop ms min / median | batched ms min / median | loop / batched (min) |")
    print("|---|---|---|---|---|---|")
    for k in (1, 2):
        for tasks in (2, 3):
            torch.manual_seed(0)
            config = AutoConfig.for_model("bert", vocab_size=99, hidden_size=384, num_hidden_layers=k,
                                          num_attention_heads=12, intermediate_size=1536, max_position_embeddings=64)
            task_layers = TaskLayers.from_encoder(AutoModel.from_config(config), tasks, k).to(device).train()
            h = torch.randn(batch.num_tokens, 384, device=device, requires_grad=True)
            weights = torch.randn(tasks, 32, 384, device=device)

            for mode in ("train", "eval"):
                task_layers.train(mode == "train")
                times = {False: [], True: []}  # by TaskLayers.batched
                for rep in range(args.reps + 3):
                    for batched, spent in times.items():
                        task_layers.batched = batched
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        tick = clock()
                        with torch.set_grad_enabled(mode == "train"), torch.autocast(device.type, torch.bfloat16,
                                                                                      enabled=autocast):
                            out = task_layers(h, batch)
                        if mode == "train":
                            (out.float() * weights).sum().backward()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        if rep >= 3:
                            spent.append(clock() - tick)
                (loop_min, loop_median), (batched_min, batched_median) = (
                    (min(t) * 1e3, statistics.median(t) * 1e3) for t in times.values())
                print(f"| {tasks} | {k} | {mode} | {loop_min:.1f} / {loop_median:.1f} | {batched_min:.1f} / "
                      f"{batched_median:.1f} | {loop_min / batched_min:.2f} |", flush=True)


if __name__ == "__main__":
    main()
