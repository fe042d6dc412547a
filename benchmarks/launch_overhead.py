"""Where each fastcls op's time goes per call, after warm-up: host time, device time, Triton compilations and
host syncs per call, against the torch eager equivalent. The diagnosis of a fixed per-call cost (on an H200 the
fused dropout + add + LayerNorm took ~0.7 ms per forward + backward whatever its size).

    python benchmarks/launch_overhead.py [--device cpu|cuda] [--ops a,b|all] [--sizes small,large|tiny]
                                         [--reps N] [--backend triton|cpp|reference] [--profile] [--json FILE]

Every row is one call as a training step makes it: forward + backward (torch.autograd.grad) of the op, or one
optimizer step. Columns:

- host us: wall time of the Python call alone, not synchronised (the device idle at its start), median;
- device us (CUDA): CUDA events around the call, queued behind a `torch.cuda._sleep` long enough that the host
  has enqueued the whole call before the device reaches it: the device's own time, launch gaps hidden. A call
  that waits for the device (a host sync) shows its stall here as well;
- loop us: back-to-back calls, synchronised at the end, per call: what a training loop pays, max(host, device);
- compiles/call: Triton JIT compilations (misses of its in-memory kernel cache; a hit of the on-disk cache
  still counts) during the timed calls, through `triton.knobs.runtime.jit_post_compile_hook` (Triton >= 3.4,
  3.6 and 3.9 alike), else the older `JITFunction` hooks, else the growth of each kernel's per-device cache
  (`device_caches`); n/a where no Triton kernel runs (the cpp backend, the interpreter);
- syncs/call (CUDA): host syncs, the larger of the warnings `torch.cuda.set_sync_debug_mode("warn")` raises and
  the synchronising CUDA runtime calls torch.profiler records (cudaStreamSynchronize, cudaMemcpy, ...);
- kernels/call (CUDA): device kernels launched (torch.profiler), copies and memsets left out;
- x vs eager: eager loop time / fastcls loop time (CPU: host times); > 1 is fastcls faster.

The eager equivalents: F.dropout; F.layer_norm(F.dropout(x) + r); F.dropout(F.layer_norm(x));
F.cross_entropy; F.cross_entropy(F.linear(F.dropout(h_cls))); F.cross_entropy(F.linear(x)); and
torch.optim.AdamW(fused=True) (foreach where fused is unavailable). On the CPU fastcls runs its cpp backend;
`TRITON_INTERPRET=1 ... --device cpu --backend triton --sizes tiny` runs the Triton kernels in the interpreter
(compile counting is then reported n/a: the interpreter compiles nothing).
--profile adds, per row, torch.profiler's top host-time entries of the fastcls call. One failing op prints its
error in its row; the others go on. --json writes {"meta": {...}, "rows": [...]}.

Over ~400 lines because it is one self-contained harness the GPU check runs first: ten op cases, each
measured four ways (host, device, compiles, syncs) on Triton 3.6 and 3.9, with the eager twin of every case.
"""
import argparse
import collections
import contextlib
import importlib
import json
import math
import os
import pkgutil
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

P = 0.1
EPS = 1e-12
SYNC_RUNTIME_CALLS = {
    "cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D",
    "cudaMemcpyFromSymbol", "cudaMemcpyToSymbol", "cuCtxSynchronize", "cuStreamSynchronize", "cuEventSynchronize",
    "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2", "cuMemcpy",
}


class Stopped(Exception):
    """SIGTERM arrived: print the rows measured so far."""


# Triton compilation counting ---------------------------------------------------------------------------------------


def _triton():
    try:
        import triton
        return triton
    except ImportError:
        return None


def interpreter_active() -> bool:
    triton = _triton()
    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    flag = getattr(knobs, "interpret", None)
    if isinstance(flag, bool):
        return flag
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_functions() -> dict[str, object]:
    """Every Triton kernel object of fastcls.kernels (autotuners and heuristics unwrapped), by module:name."""
    triton = _triton()
    if triton is None:
        return {}
    try:
        import fastcls.kernels as package
    except ImportError:
        return {}
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
        except Exception:  # noqa: BLE001 - a kernel module that does not import is reported by its op's row
            continue
        for name, value in vars(module).items():
            seen = 0
            while value is not None and seen < 5:  # Autotuner / Heuristics wrap the JITFunction in .fn
                kind = type(value).__name__
                if kind in ("JITFunction", "InterpretedFunction"):
                    found[f"{info.name}:{name}"] = value
                    break
                value = getattr(value, "fn", None) if kind in ("Autotuner", "Heuristics") else None
                seen += 1
    return found


def cache_entries(fn) -> int | None:
    """Compiled variants a JITFunction holds in memory (all devices); None where it keeps no such cache."""
    caches = getattr(fn, "device_caches", None)  # triton >= 3.0: device -> (kernel_cache, ...)
    if isinstance(caches, dict):
        total = 0
        for value in list(caches.values()):
            first = value[0] if isinstance(value, tuple) and value else None
            if not isinstance(first, dict):
                return None
            total += len(first)
        return total
    cache = getattr(fn, "cache", None)  # older triton: device -> {key: kernel}
    if isinstance(cache, dict):
        return sum(len(v) for v in cache.values() if isinstance(v, dict))
    return None


class CompileCounter:
    """Counts Triton JIT compilations while `active` (a context manager), by hook where the installed Triton has
    one, and by the growth of the kernels' in-memory caches as a cross-check (or alone, without hooks)."""

    def __init__(self):
        self.triton = _triton()
        self.functions = kernel_functions()
        self.interpreter = interpreter_active()
        self.count = 0
        self.names: collections.Counter = collections.Counter()
        self.hook_place = None  # (object, attribute)
        self._previous = None
        self.method = "n/a (triton not importable)" if self.triton is None else "cache size"
        if self.triton is None:
            return
        runtime = getattr(getattr(self.triton, "knobs", None), "runtime", None)
        places = [(runtime, "jit_post_compile_hook"), (runtime, "jit_cache_hook")]
        jit = getattr(getattr(self.triton, "runtime", None), "jit", None)
        jit_function = getattr(jit, "JITFunction", None)
        places += [(jit_function, "compiled_hook"), (jit_function, "cache_hook")]  # triton 2.x - 3.3
        for owner, attribute in places:
            if owner is not None and hasattr(owner, attribute):
                self.hook_place = (owner, attribute)
                self.method = f"{'triton.knobs.runtime' if owner is runtime else 'JITFunction'}.{attribute}"
                break

    def _hook(self, *args, **kwargs):
        self.count += 1
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or getattr(getattr(fn, "jit_function", None), "__name__", None)
        self.names[str(name or kwargs.get("repr", "?")).split("[")[0]] += 1
        if self._previous is not None:
            return self._previous(*args, **kwargs)
        return None  # a cache hook that returns a true value would skip the compilation

    def cache_total(self) -> int | None:
        sizes = [cache_entries(fn) for fn in self.functions.values()]
        return None if not sizes or any(size is None for size in sizes) else sum(sizes)

    @contextlib.contextmanager
    def active(self):
        """Yields a dict that holds, once the block ends, `hooked` (compilations seen by the hook, or None),
        `cache_growth` (new cache entries, or None) and `names` (kernel -> compilations)."""
        result = {"hooked": None, "cache_growth": None, "names": {}}
        before_total = self.cache_total()
        self.count, self.names, self._previous = 0, collections.Counter(), None
        installed = False
        if self.hook_place is not None:
            owner, attribute = self.hook_place
            try:
                self._previous = getattr(owner, attribute)
                setattr(owner, attribute, self._hook)
                installed = True
            except Exception:  # noqa: BLE001 - fall back on the cache sizes
                installed = False
        try:
            yield result
        finally:
            if installed:
                owner, attribute = self.hook_place
                setattr(owner, attribute, self._previous)
                result["hooked"] = self.count
            after_total = self.cache_total()
            if before_total is not None and after_total is not None:
                result["cache_growth"] = after_total - before_total
            result["names"] = dict(self.names)


# Timing and counting ----------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SleepCalibration:
    """torch.cuda._sleep cycles per microsecond, measured once; None where _sleep is missing."""

    def __init__(self, device):
        self.cycles_per_us = None
        if device.type != "cuda" or not hasattr(torch.cuda, "_sleep"):
            return
        try:
            torch.cuda._sleep(1000)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            cycles = 5_000_000
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            torch.cuda.synchronize()
            self.cycles_per_us = cycles / (start.elapsed_time(end) * 1e3)
        except Exception:  # noqa: BLE001 - device time then falls back on plain events
            self.cycles_per_us = None


def host_times(step, device, reps):
    """Per-call wall time of the Python call, the device idle at each start; seconds."""
    times = []
    for _ in range(reps):
        synchronize(device)
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
    synchronize(device)
    return times


def device_times(step, device, reps, sleep: SleepCalibration, host_s: float):
    """(per-call device seconds behind a _sleep, per-call seconds between plain events): lists."""
    behind, plain = [], []
    cycles = None
    if sleep.cycles_per_us:
        lead_us = min(100_000.0, 2.0 * host_s * 1e6 + 200.0)
        cycles = int(lead_us * sleep.cycles_per_us)
    for _ in range(reps):
        for queued in ((True, False) if cycles else (False,)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            synchronize(device)
            if queued:
                torch.cuda._sleep(cycles)
            start.record()
            step()
            end.record()
            end.synchronize()
            (behind if queued else plain).append(start.elapsed_time(end) / 1e3)
    return behind or plain, plain


def loop_time(step, device, reps):
    synchronize(device)
    tick = time.perf_counter()
    for _ in range(reps):
        step()
    synchronize(device)
    return (time.perf_counter() - tick) / reps


def sync_warnings(step, device, calls):
    """(host syncs torch's sync debug mode warns of in `calls` calls, the sites: file:line -> count)."""
    sites = collections.Counter()
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    count = 0
    for warning in caught:
        if "synchroniz" in str(warning.message).lower():
            count += 1
            sites[f"{Path(warning.filename).name}:{warning.lineno}"] += 1
    return count, dict(sites.most_common(4))


def profiled_counts(step, device, calls, table_rows=0):
    """(kernels, memcpys, sync runtime calls, runtime call names -> count, host-time table) over `calls` calls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        synchronize(device)  # one cudaDeviceSynchronize of our own, taken off below
    kernels = memcpys = syncs = 0
    sync_names = collections.Counter()
    for event in prof.events():
        name = event.name
        if event.device_type == torch.autograd.DeviceType.CUDA:
            lowered = name.lower()
            if lowered.startswith("memcpy"):
                memcpys += 1
            elif not lowered.startswith("memset"):
                kernels += 1
        elif name in SYNC_RUNTIME_CALLS:
            syncs += 1
            sync_names[name] += 1
    if device.type == "cuda":
        own = "cudaDeviceSynchronize"
        if sync_names.get(own):
            syncs -= 1
            sync_names[own] -= 1
            if not sync_names[own]:
                del sync_names[own]
    table = None
    if table_rows:
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=table_rows, max_name_column_width=60)
    return kernels, memcpys, syncs, dict(sync_names), table


def measure_variant(step, device, args, counter: CompileCounter | None, sleep, profile_rows=0):
    """The figures of one variant (fastcls or eager) of a case."""
    out = {}
    for _ in range(args.warmup):
        step()
    synchronize(device)
    # how many timed calls fit the budget: at least --min-reps, at most --reps
    tick = time.perf_counter()
    step()
    synchronize(device)
    one = max(time.perf_counter() - tick, 1e-6)
    reps = int(max(args.min_reps, min(args.reps, args.budget_ms / 1e3 / one)))
    out["reps"] = reps
    context = counter.active() if counter is not None else contextlib.nullcontext({})
    with context as compiles:
        host = host_times(step, device, reps)
        if device.type == "cuda":
            behind, plain = device_times(step, device, reps, sleep, statistics.median(host))
            loop = loop_time(step, device, reps)
    out["host_us"] = statistics.median(host) * 1e6
    if device.type == "cuda":
        out["device_us"] = statistics.median(behind) * 1e6
        out["event_us"] = statistics.median(plain) * 1e6
        out["loop_us"] = loop * 1e6
        calls = reps + reps * (2 if sleep.cycles_per_us else 1) + reps  # host, device, loop
    else:
        out["device_us"] = out["event_us"] = out["loop_us"] = None
        calls = reps
    if counter is not None:
        hooked, growth = compiles.get("hooked"), compiles.get("cache_growth")
        seen = hooked if hooked is not None else growth
        out["compile_calls"] = calls
        out["compiles"] = seen
        out["compiles_per_call"] = None if seen is None else seen / calls
        out["cache_growth"] = growth
        out["compiled"] = compiles.get("names") or {}
    if device.type == "cuda":
        n = min(10, max(3, reps))
        warned, sites = sync_warnings(step, device, n)
        kernels, memcpys, syncs, sync_names, table = profiled_counts(step, device, n, profile_rows)
        out.update(sync_counted_calls=n, sync_warnings_per_call=warned / n, profiler_syncs_per_call=syncs / n,
                   syncs_per_call=max(warned, syncs) / n, sync_sites=sites, sync_calls=sync_names,
                   kernels_per_call=kernels / n, memcpy_per_call=memcpys / n)
        if table:
            out["profile"] = table
    elif profile_rows:
        out["profile"] = profiled_counts(step, device, 3, profile_rows)[4]
    return out


# The cases --------------------------------------------------------------------------------------------------------


def _randn(shape, device, dtype, generator, requires_grad=False, scale=1.0):
    t = (torch.randn(shape, device=device, generator=generator) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def _grad_step(fn, inputs, upstream=None):
    def step():
        out = fn()
        torch.autograd.grad(out, inputs, upstream)
    return step


def case_dropout(device, dtype, shape, backend, gen):
    from fastcls.ops import dropout

    x = _randn(shape, device, dtype, gen, True)
    dy = _randn(shape, device, dtype, gen)
    return (_grad_step(lambda: dropout(x, P, backend=backend), [x], dy),
            _grad_step(lambda: F.dropout(x, P, training=True), [x], dy), ("dropout", dtype))


def _layer_norm_inputs(device, dtype, shape, gen, residual=True):
    x = _randn(shape, device, dtype, gen, True)
    r = _randn(shape, device, dtype, gen, True) if residual else None
    w = (1 + _randn(shape[-1:], device, torch.float32, gen, scale=0.1)).to(dtype).requires_grad_()
    b = _randn(shape[-1:], device, dtype, gen, True, scale=0.1)
    dy = _randn(shape, device, dtype, gen)
    return x, r, w, b, dy


def case_dropout_add_layer_norm(device, dtype, shape, backend, gen, with_generator=False):
    from fastcls.ops import dropout_add_layer_norm

    dropout_module = importlib.import_module("fastcls.ops.dropout")  # the package's `dropout` is the function

    x, r, w, b, dy = _layer_norm_inputs(device, dtype, shape, gen)
    inputs = [x, r, w, b]
    if with_generator:  # as the training loop draws the masks: a device-side generator, one end_step per step
        generator = dropout_module.DropoutGenerator(1234, device)

        def fused():
            with dropout_module.use_generator(generator):
                out = dropout_add_layer_norm(x, r, w, b, P, eps=EPS, backend=backend)
            return out

        inner = _grad_step(fused, inputs, dy)

        def step():
            inner()
            generator.end_step()
    else:
        step = _grad_step(lambda: dropout_add_layer_norm(x, r, w, b, P, eps=EPS, backend=backend), inputs, dy)
    eager = _grad_step(lambda: F.layer_norm(F.dropout(x, P, training=True) + r, shape[-1:], w, b, EPS), inputs, dy)
    return step, eager, ("dropout_add_layer_norm", dtype)


def case_layer_norm_dropout(device, dtype, shape, backend, gen):
    from fastcls.ops import layer_norm_dropout

    x, _, w, b, dy = _layer_norm_inputs(device, dtype, shape, gen, residual=False)
    inputs = [x, w, b]
    return (_grad_step(lambda: layer_norm_dropout(x, w, b, P, eps=EPS, backend=backend), inputs, dy),
            _grad_step(lambda: F.dropout(F.layer_norm(x, shape[-1:], w, b, EPS), P, training=True), inputs, dy),
            ("layer_norm_dropout", dtype))


def case_cross_entropy(device, dtype, shape, backend, gen, validate=False):
    from fastcls.ops import cross_entropy

    n_rows, n_classes = shape
    logits = _randn(shape, device, dtype, gen, True)
    target = torch.randint(0, n_classes, (n_rows,), device=device, generator=gen)
    return (_grad_step(lambda: cross_entropy(logits, target, backend=backend, validate=validate), [logits]),
            _grad_step(lambda: F.cross_entropy(logits, target), [logits]), ("cross_entropy", dtype))


def case_classification_head(device, dtype, shape, backend, gen):
    from fastcls.ops import classification_head

    batch, length, hidden, n_classes = shape
    h = _randn((batch, length, hidden), device, dtype, gen, True)
    w = _randn((n_classes, hidden), device, dtype, gen, True, scale=hidden ** -0.5)
    b = _randn((n_classes,), device, dtype, gen, True, scale=0.1)
    target = torch.randint(0, n_classes, (batch,), device=device, generator=gen)
    inputs = [h, w, b]

    def fused():
        return classification_head(h, w, b, target, dropout_p=P, backend=backend, validate=False)[0]

    def eager():
        return F.cross_entropy(F.linear(F.dropout(h[:, 0], P, training=True), w, b), target)

    return _grad_step(fused, inputs), _grad_step(eager, inputs), ("cross_entropy", dtype)


def case_linear_cross_entropy(device, dtype, shape, backend, gen):
    from fastcls.ops import linear_cross_entropy

    n_rows, hidden, n_classes = shape
    x = _randn((n_rows, hidden), device, dtype, gen, True)
    w = _randn((n_classes, hidden), device, dtype, gen, True, scale=hidden ** -0.5)
    target = torch.randint(0, n_classes, (n_rows,), device=device, generator=gen)
    return (_grad_step(lambda: linear_cross_entropy(x, w, target, backend=backend, validate=False), [x, w]),
            _grad_step(lambda: F.cross_entropy(F.linear(x, w), target), [x, w]),
            ("linear_cross_entropy", dtype))


def bert_parameter_shapes(hidden, layers, intermediate, vocab, n_classes=2):
    """The parameter shapes of a BERT encoder of these sizes, its pooler and a classification head."""
    shapes = [(vocab, hidden), (512, hidden), (2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (hidden,)] * 4 + [(hidden,), (hidden,)]
        shapes += [(intermediate, hidden), (intermediate,), (hidden, intermediate), (hidden,), (hidden,), (hidden,)]
    return shapes + [(hidden, hidden), (hidden,), (n_classes, hidden), (n_classes,)]


def case_adamw(device, dtype, shape, backend, gen):
    from fastcls.optim import FusedAdamW

    def parameters():
        g = torch.Generator(device=device).manual_seed(0)
        params = []
        for s in bert_parameter_shapes(*shape):
            p = torch.nn.Parameter(_randn(s, device, torch.float32, g, scale=0.02))
            p.grad = _randn(s, device, torch.float32, g, scale=1e-3)
            params.append(p)
        return params

    def groups(params):
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]

    fused = FusedAdamW(groups(parameters()), lr=5e-5, backend=backend)
    eager_params = groups(parameters())
    try:
        eager = torch.optim.AdamW(eager_params, lr=5e-5, fused=True)
        eager.step()
    except (RuntimeError, ValueError):  # fused unsupported here
        eager = torch.optim.AdamW(eager_params, lr=5e-5, foreach=True)
    return fused.step, eager.step, ("adamw", torch.float32)


def sizes_for(device: torch.device, which: str) -> dict[str, tuple]:
    """Per size label, the shape of each case family; CUDA shapes are the training step's, CPU shapes smaller so
    that the whole table takes under a minute on 2 cores."""
    if which == "tiny":
        return {"tiny": {"act": (8, 64), "ce2": (8, 2), "ceK": (8, 4096), "head": (4, 8, 64, 2),
                         "lce": (16, 32, 512), "adamw": (64, 1, 128, 256)}}
    if device.type == "cuda":
        return {
            "small": {"act": (4096, 768), "ce2": (32, 2), "ceK": (512, 32768), "head": (32, 128, 768, 2),
                      "lce": (1024, 768, 30522), "adamw": (384, 6, 1536, 30522)},
            "large": {"act": (32768, 1024), "ce2": (8192, 2), "ceK": (8192, 32768), "head": (1024, 128, 768, 2),
                      "lce": (8192, 768, 30522), "adamw": (768, 12, 3072, 30522)},
        }
    return {
        "small": {"act": (512, 384), "ce2": (32, 2), "ceK": (32, 30522), "head": (32, 128, 384, 2),
                  "lce": (32, 384, 30522), "adamw": (384, 1, 1536, 1000)},
        "large": {"act": (4096, 768), "ce2": (8192, 2), "ceK": (512, 30522), "head": (256, 128, 384, 2),
                  "lce": (256, 384, 30522), "adamw": (384, 6, 1536, 30522)},
    }


# name -> (builder, which shape, extra keyword arguments, a training-step op?)
OPS = {
    "dropout": (case_dropout, "act", {}, True),
    "dropout_add_layer_norm": (case_dropout_add_layer_norm, "act", {}, True),
    "dropout_add_layer_norm+generator": (case_dropout_add_layer_norm, "act", {"with_generator": True}, True),
    "layer_norm_dropout": (case_layer_norm_dropout, "act", {}, True),
    "cross_entropy K=2": (case_cross_entropy, "ce2", {}, True),
    "cross_entropy large K": (case_cross_entropy, "ceK", {}, True),
    # validate=True reads the targets' range back: one sync by design, which checks the sync counting
    "cross_entropy K=2 validate": (case_cross_entropy, "ce2", {"validate": True}, False),
    "classification_head": (case_classification_head, "head", {}, True),
    "linear_cross_entropy": (case_linear_cross_entropy, "lce", {}, True),
    "FusedAdamW step": (case_adamw, "adamw", {}, True),
}
SMALL_ONLY = {"cross_entropy K=2 validate"}


def shape_text(family: str, shape: tuple) -> str:
    if family == "adamw":
        n = sum(math.prod(s) for s in bert_parameter_shapes(*shape))
        return f"{n / 1e6:.1f}M params (h{shape[0]} L{shape[1]})"
    return "x".join(str(s) for s in shape)


def op_backend(name: str, dtype: torch.dtype, device, backend) -> str:
    """What runs the op's kernels for this dtype: the dispatcher's answer (adamw is registered by fastcls.optim)."""
    import fastcls.optim  # noqa: F401
    from fastcls.ops import dispatch

    try:
        return dispatch.backend_for(name, device, dtype, backend=backend)
    except Exception:  # noqa: BLE001 - a name the dispatcher does not know: the device's backend
        return dispatch.pick_backend(device, backend)


def run_case(op, size_label, shapes, device, dtype, args, counter, sleep) -> dict:
    builder, family, extra, train_step = OPS[op]
    shape = shapes[family]
    row = {"op": op, "size": size_label, "shape": shape_text(family, shape), "dtype": str(dtype).removeprefix("torch."),
           "train_step_op": train_step, "backend": None, "fastcls": None, "eager": None, "error": None}
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        fused_step, eager_step, key = builder(device, dtype, shape, args.backend, gen, **extra)
        row["backend"] = op_backend(*key, device, args.backend)
        triton_runs = row["backend"] == "triton" and counter.triton is not None
        use_counter = counter if triton_runs else None
        row["fastcls"] = measure_variant(fused_step, device, args, use_counter, sleep,
                                         profile_rows=args.profile_rows if args.profile else 0)
        if not triton_runs:
            row["fastcls"]["compiles_per_call"] = None
            row["compiles_na"] = f"{row['backend']} backend: no Triton kernel runs"
        elif counter.interpreter:
            row["compiles_na"] = "Triton interpreter: nothing is compiled"
        try:
            row["eager"] = measure_variant(eager_step, device, args, None, sleep)
        except Exception as err:  # noqa: BLE001 - the fastcls figures stand without it
            row["error"] = f"eager: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    except Exception as err:  # noqa: BLE001 - one failing op reports in its row, the others go on
        first = str(err).splitlines()[0] if str(err) else ""
        row["error"] = f"{type(err).__name__}: {first}"[:300]
        row["traceback"] = traceback.format_exc(limit=6)
    finally:
        if device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    f, e = row["fastcls"], row["eager"]
    if f and e:
        pick = "loop_us" if device.type == "cuda" else "host_us"
        row["x_vs_eager"] = e[pick] / f[pick] if f.get(pick) else None
    return row


# The table --------------------------------------------------------------------------------------------------------


def _num(value, digits=0):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def _per_call(value):
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.2f}"


def _ratio(value):
    if not value:
        return "-"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def format_table(rows, device) -> str:
    cuda = device.type == "cuda"
    head = ["op", "shape", "backend", "host us", "device us", "loop us", "compiles/call", "syncs/call",
            "kernels/call", "eager host us", "eager device us", "eager loop us", "x vs eager"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        f, e = r.get("fastcls") or {}, r.get("eager") or {}
        if r.get("compiles_na"):
            compiles = "n/a"
        else:
            compiles = _per_call(f.get("compiles_per_call"))
        cells = [r["op"], r["shape"], r.get("backend") or "-", _num(f.get("host_us")), _num(f.get("device_us")),
                 _num(f.get("loop_us")), compiles, _per_call(f.get("syncs_per_call")) if cuda else "n/a",
                 _num(f.get("kernels_per_call"), 1) if cuda else "n/a", _num(e.get("host_us")),
                 _num(e.get("device_us")), _num(e.get("loop_us")),
                 _ratio(r.get("x_vs_eager"))]
        if r.get("error") and not f:
            cells = cells[:3] + [f"ERROR {r['error']}"] + [""] * (len(head) - 4)
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = []
    for r in rows:
        f = r.get("fastcls") or {}
        label = f"{r['op']} {r['shape']}"
        if r.get("error") and f:
            notes.append(f"{label}: {r['error']}")
        if f.get("compiled"):
            notes.append(f"{label}: compiled during the timed calls: {f['compiled']}")
        over = f"over {f.get('sync_counted_calls', '?')} calls"
        if f.get("sync_sites"):
            notes.append(f"{label}: sync warnings {over}, by site: {f['sync_sites']}")
        if f.get("sync_calls"):
            notes.append(f"{label}: synchronising runtime calls {over}: {f['sync_calls']}")
        if f.get("cache_growth") and f.get("compiles") is not None and f["cache_growth"] != f["compiles"]:
            notes.append(f"{label}: kernel caches grew by {f['cache_growth']}, hook saw {f['compiles']}")
    return "\n".join(lines + [f"- {n}" for n in notes])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default="all", help=f"comma-separated from: {', '.join(OPS)}; or all")
    parser.add_argument("--sizes", default="small,large", help="small,large (default), one of them, or tiny")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], help="activations' dtype (default: bf16 CUDA, fp32 CPU)")
    parser.add_argument("--backend", choices=["triton", "cpp", "reference"], help="force fastcls's backend")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per variant at most (default 40 CUDA, "
                                                               "20 CPU)")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 CUDA, 2 CPU)")
    parser.add_argument("--budget-ms", type=float, default=None,
                        help="time per variant the timed calls aim at (default 1000 CUDA, 800 CPU)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top host-time entries "
                                                               "of each fastcls call")
    parser.add_argument("--profile-rows", type=int, default=10)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    args.reps = args.reps or (40 if cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.budget_ms = args.budget_ms or (1000.0 if cuda else 800.0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: torch.bfloat16 if cuda else torch.float32}[args.dtype]
    ops = list(OPS) if args.ops == "all" else [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; known: {', '.join(OPS)}")
    table = sizes_for(device, "tiny" if args.sizes == "tiny" else "")
    sizes = list(table) if args.sizes == "tiny" else [s.strip() for s in args.sizes.split(",")]
    if any(s not in table for s in sizes):
        parser.error(f"--sizes: from {', '.join(sizes_for(device, ''))} or tiny")
    if not cuda:
        from fastcls.components.host_memory import keep_freed_host_memory

        keep_freed_host_memory()  # as `fastcls train` does
    from fastcls.ops import dispatch

    start = time.perf_counter()
    counter = CompileCounter()
    sleep = SleepCalibration(device)
    triton = counter.triton
    meta = {"device": torch.cuda.get_device_name(device) if cuda else f"{platform.machine()} CPU, "
                                                                     f"{torch.get_num_threads()} threads",
            "torch": torch.__version__, "triton": getattr(triton, "__version__", None),
            "backend": dispatch.pick_backend(device, args.backend), "dtype": str(dtype).removeprefix("torch."),
            "date": time.strftime("%Y-%m-%d %H:%M"), "compile_counting": counter.method,
            "interpreter": counter.interpreter, "kernels_watched": len(counter.functions),
            "sleep_cycles_per_us": sleep.cycles_per_us, "reps": args.reps, "warmup": args.warmup}
    print(f"# launch overhead: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, fastcls backend "
          f"{meta['backend']}, {meta['dtype']}, {meta['date']}", flush=True)
    timing = "CUDA events behind torch.cuda._sleep" if sleep.cycles_per_us else "CUDA events" if cuda else "n/a"
    print(f"# compile counting: {counter.method} over {len(counter.functions)} kernels"
          f"{' (Triton interpreter: n/a)' if counter.interpreter else ''}; "
          f"device time: {timing}", flush=True)
    rows = []

    def stop(signum, frame):
        raise Stopped

    signal.signal(signal.SIGTERM, stop)  # `timeout` still gets the table of the rows measured so far

    def write_json():
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")

    stopped = False
    try:
        for size in sizes:
            for op in ops:
                if op in SMALL_ONLY and size == "large":
                    continue
                row = run_case(op, size, table[size], device, dtype, args, counter, sleep)
                rows.append(row)
                f = row.get("fastcls") or {}
                status = f"ERROR {row['error']}" if row.get("error") and not f else \
                    f"host {_num(f.get('host_us'))} us, loop {_num(f.get('loop_us'))} us"
                print(f"  {op} {row['shape']}: {status}", file=sys.stderr, flush=True)
                write_json()  # after every row: a run cut short keeps the rows before it
    except Stopped:
        stopped = True
        meta["stopped"] = "SIGTERM: the rows after the last one below were not measured"
    meta["seconds"] = round(time.perf_counter() - start, 1)
    print(format_table(rows, device))
    if stopped:
        print(f"- {meta['stopped']}")
    if args.profile:
        for r in rows:
            profile = (r.get("fastcls") or {}).get("profile")
            if profile:
                print(f"\n## torch.profiler, fastcls {r['op']} {r['shape']} (per {'10' if cuda else '3'} calls)")
                print(profile)
    print(f"# {meta['seconds']} s")
    write_json()
    return 1 if stopped else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
