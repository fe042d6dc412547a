"""Where a fastcls training step spends its time on the CPU: torch.profiler over a window of steps of a real
`fastcls.train` run, as a table of op groups (self CPU time per step, share of the step) and the matrix products'
achieved GFLOP/s against `F.linear` alone on the same shapes in the same process (the product-only floor).

    python benchmarks/profile_step.py                       # bundled MiniLM, bundled SST-2 rows, batch 32, bf16
    python benchmarks/profile_step.py --precision fp32 --skip 10 --steps 30
"""
import argparse
import tempfile
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastcls
from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.ops import cpp

# op-name prefixes -> the group a row of the table sums them into (first match wins; the rest is "other")
GROUPS = [
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "_LinearBf16")),
    ("attention (SDPA, softmax, varlen kernel)", ("aten::_scaled_dot_product", "aten::scaled_dot_product",
                                                  "aten::_softmax", "varlen_attention")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("optimizer", ("fastcls::adamw", "adamw", "Optimizer.step")),
    ("gradient norm / clip", ("aten::norm", "aten::linalg_vector_norm", "aten::_foreach_norm", "clip")),
    ("layer norm / dropout", ("fastcls::", "layer_norm", "dropout", "aten::native_layer_norm", "aten::layer_norm",
                              "aten::dropout")),
    ("GELU and elementwise", ("aten::gelu", "bias_gelu", "aten::add", "aten::mul", "aten::div", "aten::sub",
                              "aten::where")),
    ("index / scatter / gather", ("aten::index", "aten::scatter", "aten::gather", "aten::embedding",
                                  "aten::cat", "aten::stack")),
    ("allocation / zero", ("aten::empty", "aten::zero_", "aten::zeros", "aten::fill_", "aten::resize_")),
]


def group_of(name: str) -> str:
    for group, prefixes in GROUPS:
        if name.startswith(prefixes):
            return group
    return "other"


class LinearKernelClock:
    """FLOPs and seconds of fastcls's own products (fastcls.ops.linear's kernel calls), which the profiler sees
    only as the autograd Function's events, without shapes."""

    def __init__(self):
        self.on, self.flops, self.seconds = False, 0, 0.0
        for name, flops_of in (("linear_gemm", lambda a, packed, bias, n: 2 * a.shape[0] * a.shape[1] * n),
                               ("linear_weight_grad", lambda g, x, *rest: 2 * g.shape[0] * g.shape[1] * x.shape[1])):
            setattr(cpp, name, self.timed(getattr(cpp, name), flops_of))

    def timed(self, kernel, flops_of):
        def call(*args, **kwargs):
            if not self.on:
                return kernel(*args, **kwargs)
            start = time.perf_counter()
            out = kernel(*args, **kwargs)
            self.seconds += time.perf_counter() - start
            self.flops += flops_of(*args)
            return out
        return call


class StepProfiler(fastcls.Callback):
    """Profiles steps skip+1 .. skip+steps (the first ones warm the allocator and the caches)."""

    def __init__(self, skip: int, steps: int, clock: LinearKernelClock):
        self.skip, self.steps, self.prof, self.seconds, self.clock = skip, steps, None, 0.0, clock

    def on_step_end(self, state):
        if state.step == self.skip:
            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True)
            self.prof.__enter__()
            self.start = time.perf_counter()
            self.clock.on = True
        elif state.step == self.skip + self.steps and self.prof is not None:
            self.seconds = time.perf_counter() - self.start
            self.clock.on = False
            self.prof.__exit__(None, None, None)
            state.should_stop = True


def linear_gflops(dtype: torch.dtype) -> float:
    """F.linear forward on MiniLM's shapes (tokens x 384 -> 384 / 1152 / 1536 and 1536 -> 384), GFLOP/s."""
    flops, seconds = 0, 0.0
    for tokens in (512, 2048):
        for d_in, d_out in ((384, 384), (384, 1152), (384, 1536), (1536, 384)):
            x, w = torch.randn(tokens, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype)
            for _ in range(3):
                F.linear(x, w)
            start = time.perf_counter()
            for _ in range(10):
                F.linear(x, w)
            seconds += time.perf_counter() - start
            flops += 10 * 2 * tokens * d_in * d_out
    return flops / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="auto", help="fastcls train's --precision (auto: bf16 where fast)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip", type=int, default=5, help="steps before the profiled window")
    parser.add_argument("--steps", type=int, default=20, help="steps profiled")
    parser.add_argument("--model", help="encoder folder (default: the bundled MiniLM)")
    args = parser.parse_args()

    keep_freed_host_memory()  # as `fastcls train` does: no page faults on each step's fresh tensors
    clock = LinearKernelClock()
    profiler = StepProfiler(args.skip, args.steps, clock)
    with tempfile.TemporaryDirectory() as out:
        fastcls.train(model=args.model, output=out, dev=None, precision=args.precision, batch_size=args.batch_size,
                      max_steps=args.skip + args.steps + 1, log_every=10_000, callbacks=[profiler])
    if profiler.prof is None or not profiler.seconds:
        raise SystemExit("the run ended before the profiled window: lower --skip or --steps")
    per_group, mm_flops, mm_us, other = defaultdict(float), 0, 0.0, {}
    for event in profiler.prof.key_averages():
        per_group[group_of(event.key)] += event.self_cpu_time_total
        if group_of(event.key) == "other":
            other[event.key] = event.self_cpu_time_total
        if event.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            mm_flops += event.flops
            mm_us += event.self_cpu_time_total
    step_ms = profiler.seconds / args.steps * 1e3
    total_us = sum(per_group.values())
    print(f"{args.steps} steps profiled, {step_ms:.1f} ms a step (wall, profiler on), torch threads "
          f"{torch.get_num_threads()}")
    print(f"| op group | ms / step | share of self CPU time |\n| --- | ---: | ---: |")
    for group, us in sorted(per_group.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {us / args.steps / 1e3:.1f} | {us / total_us:.1%} |")
    largest = sorted(other.items(), key=lambda kv: -kv[1])[:6]
    print("other, largest: " + ", ".join(f"{name} {us / args.steps / 1e3:.1f} ms" for name, us in largest))
    dtype = torch.bfloat16 if args.precision in ("auto", "bf16") else torch.float32
    floor = linear_gflops(dtype)
    mm_flops += clock.flops  # fastcls's own products: their kernel calls' time (inside the Functions' events)
    mm_us += clock.seconds * 1e6
    achieved = mm_flops / max(mm_us, 1e-9) / 1e3
    print(f"\nmatrix products (aten::mm/addmm/bmm and fastcls.ops.linear's kernels, {clock.flops / max(mm_flops, 1):.0%} "
          f"of the FLOPs): {mm_flops / args.steps / 1e9:.1f} GFLOP a step in {mm_us / args.steps / 1e3:.1f} ms = "
          f"{achieved:.0f} GFLOP/s; F.linear alone on MiniLM's shapes ({dtype}): {floor:.0f} GFLOP/s, so the "
          f"products at that rate would take {mm_flops / args.steps / floor / 1e6:.1f} ms of the {step_ms:.1f} ms step")


if __name__ == "__main__":
    main()
