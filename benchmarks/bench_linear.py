"""The encoder's Linear products on the CPU in bf16, forward + backward: torch's (`F.linear`, oneDNN) against
fastcls.ops.linear (its own AVX-512 BF16 kernel, weights packed once per weight version), in one run.

    python benchmarks/bench_linear.py [--reps N] [--threads N]

MiniLM's four products (the stacked query/key/value projection 384 -> 1152, the attention output 384 -> 384, the
feed-forward 384 -> 1536 and 1536 -> 384) at token counts of a [CLS]-only last layer (32), of short and SST-2-like
batches (~110, ~450, ~1070) and of a full 32 x 128 batch. Each rep is one training step's use of a weight: its
version is bumped first, as the optimizer's update does, so fastcls packs it again inside the timed rep. Two
columns per contender: the same token count every rep, and a new one every rep (one neither contender has run), as
a fine-tuning run's batches bring (oneDNN builds new primitives for each; a step's layers then reuse them). Below
fastcls.ops.linear.MIN_ROWS rows (64: the [CLS]-only layer) fastcls runs F.linear itself. Median milliseconds; the contenders take turns rep
by rep, so that a load spike on a shared machine hits both. The allocator keeps freed memory, as `fastcls train`
does. Needs the avx512_bf16 kernels (else fastcls runs F.linear too, and the script says so).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.ops import cpp
from fastcls.ops.linear import linear

PRODUCTS = {"qkv 384->1152": (384, (384, 384, 384)), "out 384->384": (384, (384,)),
            "ffn 384->1536": (384, (1536,)), "ffn 1536->384": (1536, (384,))}


def timed_steps(fn, weights, token_counts, width, gen) -> list[float]:
    """Seconds of forward + backward at each token count, each after a weight update (a version bump)."""
    inputs = {m: torch.randn(m, width, generator=gen).to(torch.bfloat16).requires_grad_() for m in set(token_counts)}
    out_width = sum(w.shape[0] for w in weights)
    grads = {m: torch.randn(m, out_width, generator=gen).to(torch.bfloat16) for m in set(token_counts)}
    seconds = []
    for m in token_counts:
        torch.autograd.graph.increment_version(weights)
        x = inputs[m]
        start = time.perf_counter()
        torch.autograd.grad(fn(x, weights), [x, *weights], grads[m])
        seconds.append(time.perf_counter() - start)
    return seconds


def case(width: int, rows: tuple[int, ...], tokens: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(tokens)
    weights = [(0.05 * torch.randn(n, width, generator=gen)).to(torch.bfloat16).requires_grad_() for n in rows]
    contenders = {"torch": lambda x, ws: F.linear(x, torch.cat(ws) if len(ws) > 1 else ws[0]),
                  "fastcls": lambda x, ws: linear(x, ws)}
    result = {}
    for pattern in ("same", "new"):
        times = {name: [] for name in contenders}
        for name, fn in contenders.items():  # warm-up, at the count "same" times
            timed_steps(fn, weights, [tokens, tokens], width, gen)
        for i in range(reps):  # in turns, one rep each; "new": counts no contender has run (F.linear's included)
            for j, (name, fn) in enumerate(contenders.items()):
                count = tokens if pattern == "same" else tokens + 1 + len(contenders) * i + j
                times[name] += timed_steps(fn, weights, [count], width, gen)
        result[pattern] = {name: statistics.median(t) for name, t in times.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch's thread count (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_host_memory()
    if not cpp.LINEAR_BUILT:
        print("the avx512_bf16 kernels are not built or not run on this CPU: fastcls runs F.linear")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, forward + backward (input and weight "
          f"gradients), median of {args.reps}, fastcls repacking its weights every rep")
    print("| tokens | product | torch ms (same / new count) | fastcls ms (same / new) | torch / fastcls (same / new) "
          "| fastcls GFLOP/s (new) |")
    print("|---:|---|---:|---:|---:|---:|")
    for tokens in (32, 111, 453, 1068, 4096):
        for product, (width, rows) in PRODUCTS.items():
            t = case(width, rows, tokens, args.reps)
            same, new = t["same"], t["new"]
            flops = 6 * tokens * width * sum(rows)
            print(f"| {tokens} | {product} | {same['torch'] * 1e3:.3f} / {new['torch'] * 1e3:.3f} | "
                  f"{same['fastcls'] * 1e3:.3f} / {new['fastcls'] * 1e3:.3f} | "
                  f"{same['torch'] / same['fastcls']:.2f}x / {new['torch'] / new['fastcls']:.2f}x | "
                  f"{flops / new['fastcls'] / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
