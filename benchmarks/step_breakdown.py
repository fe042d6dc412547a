"""A CPU training step, op by op, without a profiler: the wall time of the forward, the backward and the optimizer
step, and the time in each of fastcls's C++ entry points (each kernel call timed around itself), over a window of
steps of a real `fastcls.train` run. Batches are grouped by length, so steps differ several-fold: a window over the
whole epoch (the default) gives the mean step that samples/s measures.

    python benchmarks/step_breakdown.py                    # first 4,000 SST-2 rows, bundled MiniLM, batch 32, bf16
    python benchmarks/step_breakdown.py --rows 2000 --skip 3 --steps 50 --precision fp32

Run it from two checkouts in turns (PYTHONPATH=<checkout>) for a before-and-after: the machine moves between runs.
"""
import argparse
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import fastcls
from fastcls.components.host_memory import keep_freed_host_memory
from fastcls.ops import dispatch

SST2_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
PHASES = ("forward", "backward", "optimizer step", "after")


class KernelClock(fastcls.Callback):
    """Times each C++ entry point and each phase of steps skip+1 .. skip+steps; phases are marked by hooks on the
    model (forward) and the optimizer (its step), the backward being what lies between."""

    def __init__(self, skip: int, steps: int):
        self.skip, self.steps, self.on, self.phase, self.mark = skip, steps, False, "forward", 0.0
        self.kernel_seconds, self.calls = defaultdict(float), Counter()
        self.phase_seconds, self.phase_kernel_seconds = defaultdict(float), defaultdict(float)
        self.wall = 0.0
        for name in dir(dispatch.cpp_ext):
            kernel = getattr(dispatch.cpp_ext, name)
            if not name.startswith("_") and callable(kernel):
                setattr(dispatch.cpp_ext, name, self._timed(name, kernel))

    def _timed(self, name, kernel):
        def call(*args, **kwargs):
            if not self.on:
                return kernel(*args, **kwargs)
            start = time.perf_counter()
            out = kernel(*args, **kwargs)
            seconds = time.perf_counter() - start
            self.kernel_seconds[name] += seconds
            self.phase_kernel_seconds[self.phase] += seconds
            self.calls[name] += 1
            return out
        return call

    def _enter(self, phase: str) -> None:
        now = time.perf_counter()
        if self.on:
            self.phase_seconds[self.phase] += now - self.mark
        self.phase, self.mark = phase, now

    def on_train_begin(self, state):
        state.model.register_forward_pre_hook(lambda *args: self._enter("forward"))
        state.model.register_forward_hook(lambda *args: self._enter("backward"))
        optimizer_step = state.optimizer.step

        def step(*args, **kwargs):
            self._enter("optimizer step")
            out = optimizer_step(*args, **kwargs)
            self._enter("after")  # the schedule, zeroing the gradients, the next batch
            return out
        state.optimizer.step = step

    def on_step_end(self, state):
        if state.step == self.skip:
            self.on, self.start = True, time.perf_counter()
        elif state.step == self.skip + self.steps and self.on:
            self.on, self.wall = False, time.perf_counter() - self.start
            state.should_stop = True


def first_rows(path: Path, rows: int, folder: str) -> Path:
    """The header and the first `rows` rows of a .tsv, as a file of their own."""
    lines = path.read_text().splitlines(keepends=True)[: rows + 1]
    out = Path(folder) / f"first_{rows}.tsv"
    out.write_text("".join(lines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, default=SST2_TRAIN, help="training .tsv (default: SST-2's)")
    parser.add_argument("--rows", type=int, default=4000, help="its first rows trained on (benchmarks/e2e.py's 4,000)")
    parser.add_argument("--precision", default="auto", help="fastcls train's --precision (auto: bf16 where fast)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip", type=int, default=3, help="steps before the timed window")
    parser.add_argument("--steps", type=int, default=120, help="steps timed (the default: the rest of the epoch)")
    args = parser.parse_args()
    if not args.train.exists():
        raise SystemExit(f"--train {args.train}: no such file (SST-2 lives in ../shared/data, see its README)")

    keep_freed_host_memory()  # as `fastcls train` does
    # the schedule notices the timed optimizer.step standing in for the one it wrapped; it still counts the steps
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    clock = KernelClock(args.skip, args.steps)
    with tempfile.TemporaryDirectory() as folder:
        fastcls.train(train=str(first_rows(args.train, args.rows, folder)), dev=None, output=folder + "/run",
                      precision=args.precision, batch_size=args.batch_size, max_length=128, epochs=1,
                      log_every=10_000,
                      callbacks=[clock])
    if not clock.wall:
        raise SystemExit("the run ended before the timed window: lower --skip or --steps")
    per_step = 1e3 / args.steps
    print(f"{args.steps} steps after {args.skip}: {clock.wall * per_step:.1f} ms a step (wall)")
    print("| part | ms / step | in the C++ kernels | outside them |\n| --- | ---: | ---: | ---: |")
    for phase in PHASES:  # "after": the schedule, zeroing the gradients, the next batch
        wall, kernels = clock.phase_seconds[phase], clock.phase_kernel_seconds[phase]
        print(f"| {phase} | {wall * per_step:.1f} | {kernels * per_step:.1f} | {(wall - kernels) * per_step:.1f} |")
    print("| C++ entry point | ms / step | calls / step |\n| --- | ---: | ---: |")
    for name, seconds in sorted(clock.kernel_seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {seconds * per_step:.2f} | {clock.calls[name] / args.steps:.1f} |")


if __name__ == "__main__":
    main()
