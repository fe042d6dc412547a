"""Attention over a packed batch on the CPU: the padded path run_layer took before (to_heads, the batched
attention with fastcls's mask-free dropout, from_heads) against the packed-sequence kernel
(fastcls.ops.varlen_attention), forward + backward, in one run.

    python benchmarks/bench_varlen_attention.py [--reps N] [--p P] [--threads N] [--model-step]

MiniLM's attention: 12 heads of 32, q, k and v the strided views of one stacked projection [T, 3 * 384] as
run_layer makes them, gradients to that projection. Batches of 32 rows: SST-2-like lengths (uniform 5-60,
seeded) and 32 x 128. Each layer also has a [CLS]-only variant (the last layer under [CLS] pooling: queries from
the 32 [CLS] tokens, keys and values from every token). Median milliseconds of a forward + backward; the ratio
is padded / kernel; the two take turns rep by rep, so that a load spike on a shared machine hits both. The
allocator keeps freed memory, as `fastcls train` does. `--model-step` adds a whole training step (forward +
backward, bf16 autocast) of the bundled MiniLM on each batch with either attention path.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.data import Encoded, collate
from fastcls.models import attention as attn
from fastcls.ops.varlen_attention import varlen_attention

HEADS, HEAD_DIM, ROWS = 12, 32, 32


def seconds_of(fn) -> float:
    tick = time.perf_counter()
    fn()
    return time.perf_counter() - tick


def packed_batch(lengths):
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = np.random.default_rng(0).integers(1000, 30000, int(lengths.sum())).astype(np.int32)
    encoded = Encoded(input_ids=ids, lengths=lengths, token_type_ids=None,
                      labels=np.zeros(len(lengths), dtype=np.int64), num_truncated=0, max_length=int(lengths.max()))
    return collate(encoded, list(range(len(lengths))), packed=True)


def padded_path(q, k, v, batch, p, cls_only):
    """run_layer's attention before the kernel."""
    queries = q.view(batch.num_rows, HEADS, 1, -1) if cls_only else batch.to_heads(q)
    out = attn.attention(queries, batch.to_heads(k), batch.to_heads(v), batch.key_mask[:, None, None, :], p)
    out = out.transpose(1, 2).flatten(-2)
    return out[:, 0] if cls_only else batch.from_heads(out)


def kernel_path(q, k, v, batch, p, cls_only):
    cu_q = torch.arange(batch.num_rows + 1) if cls_only else batch.cu_seqlens
    return varlen_attention(q, k, v, cu_q, batch.cu_seqlens, batch.max_len, p).flatten(-2)


def case(batch, dtype, p, cls_only, reps):
    generator = torch.Generator().manual_seed(0)
    width = HEADS * HEAD_DIM
    stacked = torch.randn(batch.num_tokens, 3 * width, generator=generator).to(dtype).requires_grad_()
    upstream = torch.randn(batch.num_rows if cls_only else batch.num_tokens, width, generator=generator).to(dtype)
    steps = {}
    for name, path in (("padded", padded_path), ("kernel", kernel_path)):
        def step(path=path):
            q, k, v = (t.unflatten(-1, (HEADS, -1)) for t in stacked.chunk(3, -1))
            if cls_only:
                q = q[batch.cls_index]
            torch.autograd.grad(path(q, k, v, batch, p, cls_only), stacked, upstream)
        steps[name] = step
    return alternating(steps, reps)


def alternating(steps: dict, reps: int) -> dict:
    """Median seconds of each step, the steps taking turns so that a load spike on a shared machine hits each."""
    for _ in range(2):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(seconds_of(step))
    return {name: statistics.median(t) for name, t in times.items()}


def model_step(batch, reps):
    """A training step (forward + backward, bf16 autocast) of the bundled MiniLM on the packed batch, with the
    encoder's attention on the kernel or on the padded path."""
    from transformers import AutoModel

    from fastcls.config import bundled_model_path
    from fastcls.models.classifier import EncoderClassifier

    torch.manual_seed(0)
    model = EncoderClassifier(AutoModel.from_pretrained(bundled_model_path()), num_labels=2, dropout=0.1,
                              packed=True, kernels=True).train()
    kernel_applies = attn.packed_kernel_applies

    def step(use_kernel):  # either path forced, whatever the encoder's own choice would be
        attn.packed_kernel_applies = lambda query, kernels: use_kernel
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = model(batch)
            loss.backward()
        finally:
            attn.packed_kernel_applies = kernel_applies
        model.zero_grad(set_to_none=True)

    return alternating({"padded": lambda: step(False), "kernel": lambda: step(True)}, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--p", type=float, default=0.1, help="attention dropout (MiniLM's: 0.1)")
    parser.add_argument("--threads", type=int, default=None, help="torch's thread count (default: torch's)")
    parser.add_argument("--model-step", action="store_true",
                        help="also a whole training step of the bundled MiniLM on each batch, both paths")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_host_memory()
    rng = np.random.default_rng(0)
    batches = {"SST-2-like 5-60": packed_batch(rng.integers(5, 61, ROWS)), "128": packed_batch([128] * ROWS)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, H={HEADS}, D={HEAD_DIM}, "
          f"{ROWS} rows, p={args.p}, forward + backward, median of {args.reps}")
    print("| lengths | queries | dtype | padded ms | kernel ms | padded / kernel |")
    print("|---|---|---|---:|---:|---:|")
    for label, batch in batches.items():
        for cls_only in (False, True):
            for dtype in (torch.bfloat16, torch.float32):
                seconds = case(batch, dtype, args.p, cls_only, args.reps)
                print(f"| {label} ({batch.num_tokens} tokens) | {'[CLS]' if cls_only else 'all'} | "
                      f"{str(dtype).removeprefix('torch.')} | {seconds['padded'] * 1e3:.2f} | "
                      f"{seconds['kernel'] * 1e3:.2f} | {seconds['padded'] / seconds['kernel']:.2f}x |", flush=True)
    if args.model_step:
        print("\n| MiniLM training step (bf16 autocast) | padded ms | kernel ms | padded / kernel |")
        print("|---|---:|---:|---:|")
        for label, batch in batches.items():
            seconds = model_step(batch, args.reps)
            print(f"| {label} ({batch.num_tokens} tokens) | {seconds['padded'] * 1e3:.1f} | "
                  f"{seconds['kernel'] * 1e3:.1f} | {seconds['padded'] / seconds['kernel']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
