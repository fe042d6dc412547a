"""Softmax cross-entropy and linear + cross-entropy against torch (eager, torch.compile, its chunked
F.linear_cross_entropy) and Liger-Kernel where installed: one table, ratios measured in the same run.

    python benchmarks/bench_cross_entropy.py [--device cpu|cuda] [--json FILE] [--reps N] [--no-compile]

Cross-entropy rows: forward + backward (mean, loss.backward()) of logits [N, K] against class indices; median
time. "% bw" counts the bytes a fused op must move, one read of the logits and one write of their gradient
(2 * N * K * dtype bytes), divided by the time and by the bandwidth measured in the same run: on the CPU a large
in-place add (x += 1 over 1 GiB, read + write), on CUDA a large device copy (read + write). The other variants
move more bytes; their "% bw" uses the same count, i.e. the work done, not their traffic.

Linear cross-entropy rows: forward + backward of cross_entropy(input @ W.T, target) with gradients for input and
W. On the CPU each variant runs in a child process of its own and reports its peak RSS (VmHWM, the torch
runtime included) and the peak minus the RSS once its inputs exist ("extra"); on CUDA the peak of
torch.cuda.max_memory_allocated above the inputs. The "matmuls" row is the three products of the layer alone
(logits, grad input, grad W) at full size: the floor for any implementation.

On the CPU the allocator is told to keep freed memory (as `fastcls train` does, with a higher trim threshold
for gigabyte gradients) for every variant, so no variant pays to fault in fresh pages at every step.
"""
import argparse
import ctypes
import ctypes.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bandwidth import streaming_bandwidth

from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.ops import cross_entropy, linear_cross_entropy

CPU_CE_SHAPES = [(32, 2), (4096, 30522), (8192, 30522)]
CUDA_CE_SHAPES = [(8192, 2), (8192, 32768), (8192, 131072)]
CPU_LCE = (8192, 384, 30522)
CUDA_LCE = [(16384, 768, 30522), (16384, 768, 250002)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: torch.device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def keep_freed_gigabyte_blocks() -> None:
    """keep_freed_host_memory, with the trim threshold raised to the most mallopt takes (2 GiB - 1): at 1 GiB, a
    freed 1 GB gradient plus whatever else is free at the top of the heap goes back to the OS, and the next step
    faults it in again (about 250 ms a step, for every variant)."""
    keep_freed_host_memory()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def interleaved_times(steps: dict, device: torch.device, reps: int) -> dict[str, list[float]]:
    """Each step's times, the steps taking turns so that a noisy machine slows them alike."""
    for step in steps.values():  # warm-up, compilation included
        step()
        step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_median_times(steps: dict, device: torch.device, reps: int) -> dict[str, float]:
    """Median time of each step (`interleaved_times`)."""
    return {name: statistics.median(values) for name, values in interleaved_times(steps, device, reps).items()}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def liger_cross_entropy():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        return None
    return LigerCrossEntropyLoss()


def liger_flce():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss()


def ce_rows(device: torch.device, bandwidth: float, reps: int, compile_: bool) -> tuple[list[dict], list[str]]:
    notes = []
    shapes = CPU_CE_SHAPES if device.type == "cpu" else CUDA_CE_SHAPES
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    variants = {"fastcls": lambda x, t: cross_entropy(x, t, validate=False), "torch eager": F.cross_entropy}
    if compile_:
        variants["torch.compile"] = torch.compile(F.cross_entropy)
    if device.type == "cuda":
        liger = liger_cross_entropy()
        if liger is None:
            notes.append("Liger-Kernel not installed: its rows are skipped")
        else:
            variants["Liger"] = liger
    rows = []
    for dtype in dtypes:
        for n_rows, n_classes in shapes:
            generator = torch.Generator(device=device).manual_seed(0)
            logits = torch.randn(n_rows, n_classes, device=device, dtype=dtype, generator=generator)
            target = torch.randint(0, n_classes, (n_rows,), device=device, generator=generator)
            work_bytes = 2 * logits.numel() * logits.element_size()
            shared = logits.requires_grad_()
            steps = {}
            for name, fn in variants.items():
                # Liger writes the gradient over its input: it gets a copy of its own
                x = logits.detach().clone().requires_grad_() if name == "Liger" else shared

                def step(fn=fn, x=x, target=target):
                    x.grad = None
                    fn(x, target).backward()

                steps[name] = step
            times = interleaved_median_times(steps, device, reps if logits.numel() > 1 << 20 else reps * 20)
            for name, seconds in times.items():
                rows.append({
                    "op": "cross_entropy", "shape": f"{n_rows}x{n_classes}", "dtype": str(dtype).split(".")[1],
                    "impl": name, "ms": seconds * 1e3, "pct_bw": 100 * work_bytes / seconds / bandwidth,
                    "fastcls_speedup": seconds / times["fastcls"],
                })
            del logits, shared, steps
    return rows, notes


def _lce_inputs(n_rows, dim, n_classes, dtype, device):
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n_rows, dim, device=device, generator=generator).to(dtype).requires_grad_()
    w = (torch.randn(n_classes, dim, device=device, generator=generator) * dim**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, n_classes, (n_rows,), device=device, generator=generator)
    return x, w, target


def lce_variant(name: str, device: torch.device):
    """(step function of x, w, target) or None where the variant does not exist here."""
    if name == "fastcls":
        return lambda x, w, t: linear_cross_entropy(x, w, t, validate=False).backward()
    if name == "torch plain":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t).backward()
    if name == "torch chunked":
        if not hasattr(F, "linear_cross_entropy"):
            return None
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options).backward()
    if name == "Liger FLCE":
        flce = liger_flce()
        return None if flce is None else (lambda x, w, t: flce(w, x, t).backward())
    if name == "matmuls":
        def products(x, w, t):
            with torch.no_grad():
                logits = x @ w.t()
                logits @ w
                logits.t() @ x
        return products
    raise ValueError(name)


def lce_child(spec: str, reps: int) -> None:
    """Runs one CPU linear cross-entropy case in this (fresh) process and prints its figures as JSON."""
    name, dtype_name = spec.split(":")
    keep_freed_gigabyte_blocks()
    step = lce_variant(name, torch.device("cpu"))
    x, w, target = _lce_inputs(*CPU_LCE, getattr(torch, dtype_name), torch.device("cpu"))
    base_mb = peak_rss_mb()

    def run():
        x.grad = w.grad = None
        step(x, w, target)

    seconds = median_time(run, torch.device("cpu"), reps)
    peak_mb = peak_rss_mb()
    print(json.dumps({"ms": seconds * 1e3, "peak_mb": peak_mb, "extra_mb": peak_mb - base_mb}))


def lce_rows_cpu(reps: int) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    n_rows, dim, n_classes = CPU_LCE
    for dtype_name in ("float32", "bfloat16"):
        results = {}
        for name in ("fastcls", "torch chunked", "torch plain", "matmuls"):
            if lce_variant(name, torch.device("cpu")) is None:
                notes.append(f"{name}: not available in torch {torch.__version__}")
                continue
            child = subprocess.run([sys.executable, __file__, "--lce-child", f"{name}:{dtype_name}", "--reps",
                                    str(reps)], capture_output=True, text=True, check=True)
            results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        for name, figures in results.items():
            rows.append({
                "op": "linear_cross_entropy", "shape": f"{n_rows}x{dim}x{n_classes}",
                "dtype": {"float32": "float32", "bfloat16": "bfloat16"}[dtype_name], "impl": name, **figures,
                "fastcls_speedup": figures["ms"] / results["fastcls"]["ms"],
            })
    return rows, notes


def lce_rows_cuda(reps: int) -> tuple[list[dict], list[str]]:
    device = torch.device("cuda")
    rows, notes = [], []
    for n_rows, dim, n_classes in CUDA_LCE:
        results = {}
        for name in ("fastcls", "torch plain", "torch chunked", "Liger FLCE", "matmuls"):
            step = lce_variant(name, device)
            if step is None:
                notes.append(f"{name}: not available here")
                continue
            x, w, target = _lce_inputs(n_rows, dim, n_classes, torch.bfloat16, device)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()

            def run(step=step, x=x, w=w, target=target):
                x.grad = w.grad = None
                step(x, w, target)

            try:
                seconds = median_time(run, device, reps)
            except torch.OutOfMemoryError:
                notes.append(f"{name} at K={n_classes}: out of memory")
                continue
            results[name] = {"ms": seconds * 1e3,
                             "extra_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
            del x, w, target
            torch.cuda.empty_cache()
        for name, figures in results.items():
            rows.append({"op": "linear_cross_entropy", "shape": f"{n_rows}x{dim}x{n_classes}", "dtype": "bfloat16",
                         "impl": name, **figures, "fastcls_speedup": figures["ms"] / results["fastcls"]["ms"]})
    return rows, notes


def print_table(device_name: str, bandwidth: float, yardstick: str, rows: list[dict], notes: list[str]) -> None:
    print(f"# {device_name}, torch {torch.__version__}, streaming bandwidth {bandwidth / 1e9:.1f} GB/s: {yardstick}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| op | shape | dtype | impl | ms | % bw | peak MB | extra MB | fastcls speedup |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        pct = f"{row['pct_bw']:.0f}" if "pct_bw" in row else ""
        peak = f"{row['peak_mb']:.0f}" if "peak_mb" in row else ""
        extra = f"{row['extra_mb']:.0f}" if "extra_mb" in row else ""
        print(f"| {row['op']} | {row['shape']} | {row['dtype']} | {row['impl']} | {row['ms']:.2f} | {pct} | {peak} "
              f"| {extra} | {row['fastcls_speedup']:.2f}x |")
    for note in notes:
        print(f"- {note}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per case (median)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--lce-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.lce_child:
        lce_child(args.lce_child, args.reps)
        return
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_gigabyte_blocks()
        device_name = f"CPU, {torch.get_num_threads()} threads"
    else:
        device_name = torch.cuda.get_device_name()
    bandwidth, yardstick = streaming_bandwidth(device)
    rows, notes = ce_rows(device, bandwidth, args.reps, not args.no_compile)
    lce_rows, lce_notes = lce_rows_cpu(max(2, args.reps // 2)) if device.type == "cpu" else lce_rows_cuda(args.reps)
    rows += lce_rows
    notes += lce_notes
    print_table(device_name, bandwidth, yardstick, rows, notes)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "bandwidth_gb_s": bandwidth / 1e9,
                                               "yardstick": yardstick, "rows": rows, "notes": notes}, indent=2))


if __name__ == "__main__":
    main()
