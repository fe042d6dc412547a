"""The feed-forward block's GELU on the CPU: torch's (the product's bias added by addmm, then `gelu`, and in the
backward `gelu_backward` and the bias gradient's `sum`) against fastcls.ops.bias_gelu (the product without its
bias, then one pass each way), forward + backward, in one run.

    python benchmarks/bench_bias_gelu.py [--reps N] [--threads N]

MiniLM's first feed-forward product, tokens x 384 -> 1536, bf16 weights (as the bf16 CPU step stores them) and
fp32; token counts of a [CLS]-only last layer (32) and of SST-2-like (~450, ~1070) and 32 x 128 batches. Two rows
per case: the activation alone (x [T, 1536] in, gradients of x and the bias out) and the product with it
(gradients of the input, weight and bias). Median milliseconds; the contenders take turns rep by rep, so that a
load spike on a shared machine hits both. The allocator keeps freed memory, as `fastcls train` does.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_varlen_attention import alternating

from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.ops.bias_gelu import bias_gelu

D_MODEL, D_FF = 384, 1536


def case(tokens: int, dtype: torch.dtype, reps: int) -> dict:
    gen = torch.Generator().manual_seed(tokens)
    h = torch.randn(tokens, D_MODEL, generator=gen).to(dtype).requires_grad_()
    weight = (0.05 * torch.randn(D_FF, D_MODEL, generator=gen)).to(dtype).requires_grad_()
    bias = (0.05 * torch.randn(D_FF, generator=gen)).to(dtype).requires_grad_()
    x = torch.randn(tokens, D_FF, generator=gen).to(dtype).requires_grad_()
    grad = torch.randn(tokens, D_FF, generator=gen).to(dtype)

    def run(fn, inputs):
        def step():
            out = fn()
            torch.autograd.grad(out, inputs, grad)
        return step

    activation = alternating({
        "torch": run(lambda: F.gelu(x + bias), [x, bias]),
        "fastcls": run(lambda: bias_gelu(x, bias), [x, bias])}, reps)
    with_product = alternating({
        "torch": run(lambda: F.gelu(F.linear(h, weight, bias)), [h, weight, bias]),
        "fastcls": run(lambda: bias_gelu(F.linear(h, weight), bias), [h, weight, bias])}, reps)
    return {"activation": activation, "product + activation": with_product}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch's thread count (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_host_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {D_MODEL} -> {D_FF}, forward + backward, "
          f"median of {args.reps}")
    print("| tokens | dtype | what | torch ms | fastcls ms | torch / fastcls |")
    print("|---:|---|---|---:|---:|---:|")
    for tokens in (32, 453, 1068, 4096):
        for dtype in (torch.bfloat16, torch.float32):
            for what, seconds in case(tokens, dtype, args.reps).items():
                print(f"| {tokens} | {str(dtype).removeprefix('torch.')} | {what} | {seconds['torch'] * 1e3:.3f} | "
                      f"{seconds['fastcls'] * 1e3:.3f} | {seconds['torch'] / seconds['fastcls']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
