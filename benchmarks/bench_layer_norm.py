"""Fused dropout + residual add + LayerNorm against torch eager and torch.compile, and a patched against an
unpatched encoder's training step.

    python benchmarks/bench_layer_norm.py [--device cpu|cuda] [--json FILE] [--no-compile] [--reps N]

Op rows: forward + backward of LayerNorm(dropout(x) + residual), p = 0.1, gradients for x, residual, weight and
bias. Bytes are counted as the fused op must move them: the forward reads x and residual and writes y, the
backward reads dy and y and writes dx and dresidual: 7 * N * H * dtype bytes (weights and row statistics
are noise). "% bw" divides that by the time and by the streaming bandwidth measured in the same run
(benchmarks/bandwidth.py: a large in-place add on the CPU, a copy on CUDA; read + write). The eager and compiled rows move more bytes
(mask, pre-norm sum): their GB/s use the same 7 N H d count, i.e. the work done, not their traffic.

On the CPU the allocator is told to keep freed memory, as `fastcls train` does, for every variant.

Model rows: one forward + backward of a batch (CPU: the bundled MiniLM, fp32, 32 x 128 tokens; CUDA: a random
BERT-base-sized BertForSequenceClassification, bf16 autocast, 32 x 128), unpatched vs `fastcls.patch`ed:
median time, the bytes autograd keeps for the backward (distinct storages, parameters excluded), per token, and
on CUDA torch.cuda.max_memory_allocated.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bandwidth import streaming_bandwidth

from fastcls.components.activation_memory import saved_activation_bytes
from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.ops import dispatch, dropout_add_layer_norm

P = 0.1
EPS = 1e-12


def timer(device: torch.device):
    def measure(fn, reps: int, warmup: int = 2) -> float:
        """Median seconds of fn over reps runs, after warmup runs."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                tick = time.perf_counter()
                fn()
                times.append(time.perf_counter() - tick)
        return statistics.median(times)
    return measure


def eager(x, residual, weight, bias):
    return F.layer_norm(F.dropout(x, P, training=True) + residual, (x.shape[-1],), weight, bias, EPS)


def fused(x, residual, weight, bias):
    return dropout_add_layer_norm(x, residual, weight, bias, P, eps=EPS)


def op_rows(device, dtype, shapes, measure, reps, use_compile, bandwidth):
    compiled = None
    if use_compile:
        try:
            compiled = torch.compile(eager, dynamic=False)
        except Exception as err:  # noqa: BLE001 - whatever stops torch.compile skips its rows, saying why
            print(f"torch.compile unavailable: {err}", file=sys.stderr)
    rows = []
    for n_rows, hidden in shapes:
        generator = torch.Generator(device=device).manual_seed(0)
        x, residual, dy = (torch.randn(n_rows, hidden, device=device, generator=generator).to(dtype)
                           for _ in range(3))
        x.requires_grad_()
        residual.requires_grad_()
        weight = (1 + 0.1 * torch.randn(hidden, device=device, generator=generator)).to(dtype).requires_grad_()
        bias = (0.1 * torch.randn(hidden, device=device, generator=generator)).to(dtype).requires_grad_()
        inputs = (x, residual, weight, bias)
        work_bytes = 7 * n_rows * hidden * x.element_size()
        variants = {"fastcls": fused, "torch eager": eager}
        if compiled is not None:
            variants["torch.compile"] = compiled
        seconds = {}
        for name, fn in variants.items():
            def step(fn=fn, inputs=inputs, dy=dy):
                torch.autograd.grad(fn(*inputs), inputs, dy)
            try:
                seconds[name] = measure(step, reps)
            except Exception as err:  # noqa: BLE001 - a failed compile skips its row, saying why
                print(f"{name} at {n_rows}x{hidden} failed: {str(err).splitlines()[0]}", file=sys.stderr)
        for name, sec in seconds.items():
            rows.append({
                "kind": "op", "shape": f"{n_rows}x{hidden}", "dtype": str(dtype).removeprefix("torch."),
                "impl": name, "ms": sec * 1e3, "GB/s": work_bytes / sec / 1e9,
                "% bw": 100 * work_bytes / sec / bandwidth,
                "x vs eager": seconds["torch eager"] / sec if "torch eager" in seconds else None,
            })
    return rows


def model_rows(device, measure, reps):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    import fastcls
    from fastcls.config import bundled_model_path

    batch_size, length = 32, 128
    if device.type == "cuda":
        name = "BERT-base (random), bf16 autocast"
        config = AutoConfig.for_model("bert", num_labels=2)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        name = "MiniLM (bundled), fp32"
        config = AutoConfig.from_pretrained(bundled_model_path(), num_labels=2)
        autocast = torch.autocast("cpu", enabled=False)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, config.vocab_size, (batch_size, length), generator=generator).to(device),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator).to(device),
    }
    models = {}
    for patched in (False, True):
        torch.manual_seed(0)
        if device.type == "cuda":
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(bundled_model_path(), num_labels=2)
        model = model.to(device).train()
        if patched:
            fastcls.patch(model)
        models["fastcls.patch" if patched else "unpatched"] = model

    def step(model):
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    # the two models take turns, so that a load spike on a shared machine hits both
    for model in models.values():
        step(model)
    times = {impl: [] for impl in models}
    for _ in range(reps):
        for impl, model in models.items():
            times[impl].append(measure(lambda model=model: step(model), 1, warmup=0))
    rows = []
    for impl, model in models.items():
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(model)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
        with autocast:
            kept = saved_activation_bytes(model, lambda model=model: model(**batch).loss)
        model.zero_grad(set_to_none=True)
        rows.append({"kind": "model", "model": name, "impl": impl, "ms": statistics.median(times[impl]) * 1e3,
                     "saved MiB": kept / 2**20, "saved bytes/token": kept / (batch_size * length),
                     "peak MiB": peak})
    rows[1]["x vs unpatched"] = rows[0]["ms"] / rows[1]["ms"]
    rows[1]["saved bytes/token less"] = rows[0]["saved bytes/token"] - rows[1]["saved bytes/token"]
    return rows


def format_table(rows, bandwidth_label, bandwidth):
    lines = [f"streaming bandwidth: {bandwidth / 1e9:.1f} GB/s ({bandwidth_label}), measured in this run"]
    lines.append(f"{'shape':>10} {'dtype':>9} {'impl':>14} {'ms':>9} {'GB/s':>8} {'% bw':>6} {'x vs eager':>10}")
    for r in (r for r in rows if r["kind"] == "op"):
        ratio = f"{r['x vs eager']:.2f}" if r["x vs eager"] is not None else "-"
        lines.append(f"{r['shape']:>10} {r['dtype']:>9} {r['impl']:>14} {r['ms']:9.3f} {r['GB/s']:8.1f} "
                     f"{r['% bw']:6.1f} {ratio:>10}")
    model = [r for r in rows if r["kind"] == "model"]
    if model:
        lines.append("")
        lines.append(f"{model[0]['model']}, batch 32 x 128, forward + backward")
        lines.append(f"{'impl':>14} {'ms':>9} {'x':>6} {'saved MiB':>10} {'bytes/token':>12} {'peak MiB':>9}")
        for r in model:
            speed = f"{r.get('x vs unpatched', 1.0):.2f}"
            peak = f"{r['peak MiB']:.0f}" if r["peak MiB"] is not None else "-"
            lines.append(f"{r['impl']:>14} {r['ms']:9.1f} {speed:>6} {r['saved MiB']:10.1f} "
                         f"{r['saved bytes/token']:12.0f} {peak:>9}")
        lines.append(f"activation memory saved per token: {model[1]['saved bytes/token less']:.0f} bytes")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (slow to compile)")
    parser.add_argument("--no-model", action="store_true", help="skip the model step rows")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per row (default: 10 CPU, 50 CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    reps = args.reps or (50 if device.type == "cuda" else 10)
    if device.type == "cpu":
        keep_freed_host_memory()  # as `fastcls train` does: no page faults on each step's fresh tensors
    measure = timer(device)
    torch.manual_seed(0)
    bandwidth, bandwidth_label = streaming_bandwidth(device)
    if device.type == "cuda":
        # 4096x768: the BERT-base batch of the H200 runs; 8192x1024 and up: the bandwidth target's shapes
        shapes, dtypes = [(32 * 128, 768), (8192, 768), (8192, 1024), (16384, 1024)], [torch.bfloat16]
    else:
        shapes, dtypes = [(32 * 128, 768), (8192, 1024)], [torch.float32, torch.bfloat16]
    rows = []
    for dtype in dtypes:
        rows += op_rows(device, dtype, shapes, measure, reps, not args.no_compile, bandwidth)
    if not args.no_model:
        rows += model_rows(device, measure, max(3, reps // 5))
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "torch": torch.__version__, "backend": dispatch.pick_backend(device),
            "date": time.strftime("%Y-%m-%d"), "bandwidth_GBps": bandwidth / 1e9, "bandwidth_kind": bandwidth_label}
    print(f"{meta['device']}, torch {meta['torch']}, fastcls backend {meta['backend']}, {meta['date']}")
    print(format_table(rows, bandwidth_label, bandwidth))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
