"""Each C++ kernel per CPU variant (baseline, avx2, avx512, avx512_bf16): time per op as a ratio to the best
variant in the same run.

    python benchmarks/bench_cpu_variants.py [--reps N] [--json FILE]

Every variant the CPU runs is loaded into this one process (each is its own module, fastcls._C_<variant>) and the
ops' C++ backend is pointed at each in turn, round-robin within every repetition, so that a shared or throttled
CPU slows all variants alike; a cell is the median over --reps. Rows, all forward + backward unless marked:
AdamW steps over all-MiniLM-L6-v2's 22.7M parameters (fp32, and bf16 with fp32 master weights); cross-entropy
over 4096 x 2048 logits (fp32, bf16); LayerNorm (forward, and forward + backward) and dropout(p=0.1) + residual
add + LayerNorm over 32 x 128 tokens of width 384 (MiniLM's), fp32 and bf16.
"""
import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_adamw import groups, make_parameters, parameter_shapes

from fastcls.ops import cpu_variant, cross_entropy, dispatch, dropout_add_layer_norm
from fastcls.optim import FusedAdamW


def adamw_case(dtype, generator):
    params = make_parameters(parameter_shapes("minilm"), torch.device("cpu"), dtype, generator)
    optimizer = FusedAdamW(groups(params), lr=1e-4, master_weights=dtype != torch.float32, backend="cpp")
    return optimizer.step


def cross_entropy_case(dtype, generator):
    logits = torch.randn(4096, 2048, generator=generator).to(dtype).requires_grad_()
    target = torch.randint(0, 2048, (4096,), generator=generator)

    def step():
        logits.grad = None
        cross_entropy(logits, target, backend="cpp").backward()
    return step


def layer_norm_case(dtype, generator, p, residual, backward):
    x = torch.randn(32 * 128, 384, generator=generator).to(dtype).requires_grad_(backward)
    other = torch.randn(32 * 128, 384, generator=generator).to(dtype).requires_grad_(backward) if residual else None
    weight = torch.randn(384, generator=generator).requires_grad_(backward)
    bias = torch.randn(384, generator=generator).requires_grad_(backward)
    upstream = torch.randn(32 * 128, 384, generator=generator).to(dtype)

    def step():
        with torch.set_grad_enabled(backward):
            out = dropout_add_layer_norm(x, other, weight, bias, p, seed=7, backend="cpp")
            if backward:
                out.backward(upstream)
    return step


CASES = {
    "adamw fp32 (MiniLM)": lambda g: adamw_case(torch.float32, g),
    "adamw bf16+master (MiniLM)": lambda g: adamw_case(torch.bfloat16, g),
    "cross_entropy fp32": lambda g: cross_entropy_case(torch.float32, g),
    "cross_entropy bf16": lambda g: cross_entropy_case(torch.bfloat16, g),
    "layer_norm fwd fp32": lambda g: layer_norm_case(torch.float32, g, 0.0, False, False),
    "layer_norm fwd+bwd fp32": lambda g: layer_norm_case(torch.float32, g, 0.0, False, True),
    "layer_norm fwd+bwd bf16": lambda g: layer_norm_case(torch.bfloat16, g, 0.0, False, True),
    "dropout+add+LN fwd+bwd fp32": lambda g: layer_norm_case(torch.float32, g, 0.1, True, True),
    "dropout+add+LN fwd+bwd bf16": lambda g: layer_norm_case(torch.bfloat16, g, 0.1, True, True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", help="also write the times (ms) here")
    args = parser.parse_args()
    if dispatch.cpp_ext is None:
        sys.exit(f"C++ kernels not built: {dispatch.CPP_ERROR}")
    modules = {v: importlib.import_module(f"fastcls._C_{v}") for v in cpu_variant.VARIANTS
               if dispatch.cpp_ext.cpu_supports(v) and importlib.util.find_spec(f"fastcls._C_{v}")}
    times = {}
    for case, make in CASES.items():
        step = make(torch.Generator().manual_seed(0))
        samples = {variant: [] for variant in modules}
        for rep in range(args.reps + 2):  # the first two rounds warm up
            for variant, module in modules.items():
                dispatch.cpp_ext = module
                tick = time.perf_counter()
                step()
                if rep >= 2:
                    samples[variant].append(time.perf_counter() - tick)
        times[case] = {variant: statistics.median(s) * 1e3 for variant, s in samples.items()}
    print(f"C++ kernels per CPU variant, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; time / best variant's (best = 1.00), best's ms in the last column")
    width = max(len(case) for case in times) + 2
    print(f"{'op':<{width}}" + "".join(f"{v:>13}" for v in modules) + f"{'best ms':>10}")
    for case, by_variant in times.items():
        best = min(by_variant.values())
        print(f"{case:<{width}}" + "".join(f"{t / best:>13.2f}" for t in by_variant.values()) + f"{best:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "ms": times}, indent=1))


if __name__ == "__main__":
    main()
