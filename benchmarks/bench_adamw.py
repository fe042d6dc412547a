"""One AdamW step over a whole encoder's parameters: fastcls's FusedAdamW against torch.optim.AdamW.

    python benchmarks/bench_adamw.py [--device cpu|cuda] [--models minilm,bert-base] [--configs fp32,bf16-master]
                                     [--steps N] [--repeats N] [--json F]

CPU: fastcls's C++ step against torch's foreach=True and fused=True. CUDA: fastcls's Triton step against the
same two, in fp32 and in bf16 with fp32 master weights (torch has no master weights: its rows widen the bf16
gradients into fp32 masters, step those, and round them back into the parameters). fastcls and torch fused also
run with the learning rate as a 0-dim fp32 tensor on the device (lr "tensor"), as a CUDA-graph-captured step
with `fastcls.components.lr_schedule.DeviceLRSchedule` reads it; torch's foreach path takes a tensor lr only
with capturable=True and is left out there. Gradient clipping to norm MAX_GRAD_NORM: `torch.nn.utils.
clip_grad_norm_(foreach=True)` before fastcls's step and before torch fused's (the training loop's way and the
Trainer's) against FusedAdamW(max_grad_norm=...), which clips inside its step; speedup_vs_clip_grad_norm_ is
the first's time over the last's. Parameter sets: the shapes of all-MiniLM-L6-v2 (22.7M), BERT-base
(bert-base-uncased's 110M: embeddings 30522x768, 512x768, 2x768; 12 layers of four 768x768, 3072x768 and
768x3072 matrices, biases and LayerNorms; the pooler; a 2-label head) and BERT-large (335M), from a BertConfig
(no download, random values), split into a decayed group (matrices) and an undecayed one (biases, LayerNorm), as
the training loop does. All optimizers step the same parameters and gradients; the gradients never change
address, so fastcls's address table is built once. On the CPU a run times 3 steps (10 on CUDA): torch's foreach
step over BERT-base takes up to seconds there, and `--repeats 1` should finish within a minute on two cores.

The same run measures the memory's streaming bandwidth (benchmarks/bandwidth.py: an in-place add on the CPU, a
device copy on CUDA, read + write counted). GB/s for an optimizer
counts the 28 bytes per parameter a step must move at least, for fp32 (read w, g, m, v; write w, m, v) and for
bf16 with fp32 master (read g, master, m, v; write master, m, v, w) alike, plus for clipping rows one more read
of the gradient (the norm must be known before the first update). speedup_vs_torch_fused is torch
fused's time over the row's, with the same kind of lr and clipping. CUDA rows also count the kernels launched
per step (torch.profiler). Timings are medians of --repeats rounds, a round timing --steps steps of every
contender in turn (all of a parameter set's optimizers are alive at once: ~8 sets of moments); the speedups are
medians of the ratios within a round.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bandwidth import streaming_bandwidth

from fastcls.ops import dispatch
from fastcls.optim import FusedAdamW

MODELS = {
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "bert-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096},
}
# per parameter and step, fp32 (read w, g, m, v; write w, m, v) or bf16 with fp32 master (read g, master, m, v;
# write master, m, v, w): what the job must move at least, whoever moves more
BYTES_PER_PARAM = 28
# (parameter dtype, master weights)
CONFIGS = {"fp32": (torch.float32, False), "bf16-master": (torch.bfloat16, True)}
DEFAULT_CONFIGS = {"cpu": "fp32", "cuda": "fp32,bf16-master"}
DEFAULT_MODELS = {"cpu": "minilm,bert-base", "cuda": "bert-base,bert-large"}
DEFAULT_STEPS = {"cpu": 3, "cuda": 10}
LR = 1e-4
MAX_GRAD_NORM = 1.0  # below the gradients' norm (~5 for MiniLM's 22.7M at 1e-3 each): the first step clips


def parameter_shapes(model: str) -> list[torch.Size]:
    """The encoder's parameter shapes plus a 2-label classification head, built on the meta device."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, max_position_embeddings=512, **MODELS[model])
    with torch.device("meta"):
        encoder = BertModel(config, add_pooling_layer=True)
    hidden = MODELS[model]["hidden_size"]
    return [p.shape for p in encoder.parameters()] + [torch.Size([2, hidden]), torch.Size([2])]


def make_parameters(shapes, device, dtype, generator):
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).mul_(0.02).to(device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=generator).mul_(1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def groups(params):
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_in_turns(fns, device, steps: int, repeats: int, warmup: int = 3) -> list[list[float]]:
    """Each function's mean time of `steps` calls in each of `repeats` rounds, in ms. A round times every
    function in turn, so that a shared machine's drift falls on all of them alike, each after one untimed call:
    the optimizers share the parameters, and FusedAdamW's first step after another optimizer wrote them refreshes
    its master weights from them."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            fn()
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            synchronize(device)
            times.append((time.perf_counter() - start) / steps * 1e3)
    return samples


def paired_speedup(baseline: list[float], times: list[float]) -> float:
    """The median over rounds of the baseline's time over the row's in the same round: a round's load on a shared
    machine weighs on both alike."""
    return round(statistics.median(b / t for b, t in zip(baseline, times, strict=True)), 3)


def kernels_per_step(step, device) -> int | None:
    """CUDA kernels one call of step() launches (memory copies excluded), counted with torch.profiler."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for name in names if not name.lower().startswith(("memcpy", "memset")))


class TorchWithMasterCopies:
    """torch.optim.AdamW on fp32 master copies of bf16 parameters, as one would run it without master-weight
    support: widen the gradients into the masters', step, round the masters into the parameters."""

    def __init__(self, param_groups, **kwargs):
        self.params = [p for g in param_groups for p in g["params"]]
        self.masters = {p: torch.nn.Parameter(p.detach().float()) for p in self.params}
        for master in self.masters.values():
            master.grad = torch.zeros_like(master)
        master_groups = [{**g, "params": [self.masters[p] for p in g["params"]]} for g in param_groups]
        self.optimizer = torch.optim.AdamW(master_groups, **kwargs)

    @torch.no_grad()
    def step(self):
        masters = list(self.masters.values())
        torch._foreach_copy_([m.grad for m in masters], [p.grad for p in self.params])
        self.optimizer.step()
        torch._foreach_copy_(self.params, masters)


class ClipThenStep:
    """clip_grad_norm_ over the optimizer's parameters, then its step: clipping as a separate pass."""

    def __init__(self, optimizer, param_groups):
        self.optimizer = optimizer
        self.params = [p for g in param_groups for p in g["params"]]

    def step(self):
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM, foreach=True)
        self.optimizer.step()


def optimizers(master: bool, device: torch.device):
    """(name, lr kind, whether it clips, factory) of each contender."""
    torch_kind = TorchWithMasterCopies if master else torch.optim.AdamW
    suffix = " + master copies" if master else ""

    def tensor_lr():
        return torch.tensor(LR, device=device)

    return [
        ("fastcls", "float", False, lambda g: FusedAdamW(g, lr=LR, master_weights=master)),
        ("fastcls", "tensor", False, lambda g: FusedAdamW(g, lr=tensor_lr(), master_weights=master)),
        ("torch foreach" + suffix, "float", False, lambda g: torch_kind(g, lr=LR, foreach=True)),
        ("torch fused" + suffix, "float", False, lambda g: torch_kind(g, lr=LR, fused=True)),
        ("torch fused" + suffix, "tensor", False, lambda g: torch_kind(g, lr=tensor_lr(), fused=True)),
        ("clip_grad_norm_ + torch fused" + suffix, "float", True,
         lambda g: ClipThenStep(torch_kind(g, lr=LR, fused=True), g)),
        ("clip_grad_norm_ + fastcls", "float", True,
         lambda g: ClipThenStep(FusedAdamW(g, lr=LR, master_weights=master), g)),
        ("fastcls max_grad_norm", "float", True,
         lambda g: FusedAdamW(g, lr=LR, master_weights=master, max_grad_norm=MAX_GRAD_NORM)),
    ]


def bench_model(model, device, dtype, master, args, generator):
    shapes = parameter_shapes(model)
    params = make_parameters(shapes, device, dtype, generator)
    n_params = sum(p.numel() for p in params)
    grad_bytes = torch.finfo(dtype).bits // 8
    contenders = []
    for name, lr_kind, clips, factory in optimizers(master, device):
        try:
            optimizer = factory(groups(params))
            optimizer.step()
        except (RuntimeError, ValueError) as err:  # e.g. fused=True unsupported for this device/dtype here
            print(f"skipping {name} (lr {lr_kind}) on {model}: {err}", file=sys.stderr)
            continue
        contenders.append((name, lr_kind, clips, optimizer))
    samples = time_in_turns([c[-1].step for c in contenders], device, args.steps, args.repeats)
    rows = []
    for (name, lr_kind, clips, optimizer), times in zip(contenders, samples):
        ms = statistics.median(times)
        rows.append({"model": model, "params_M": round(n_params / 1e6, 2),
                     "dtype": "bf16+master" if master else str(dtype).removeprefix("torch."),
                     "optimizer": name, "lr": lr_kind, "ms_per_step": round(ms, 3), "clip": clips,
                     "GBps": round(n_params * (BYTES_PER_PARAM + clips * grad_bytes) / ms / 1e6, 1),
                     "kernels_per_step": kernels_per_step(optimizer.step, device)})
    del contenders
    fused = {(r["lr"], r["clip"]): times for r, times in zip(rows, samples) if "torch fused" in r["optimizer"]}
    unfused_clip = next((times for r, times in zip(rows, samples) if r["optimizer"] == "clip_grad_norm_ + fastcls"),
                        None)
    for r, times in zip(rows, samples):
        baseline = fused.get((r["lr"], r["clip"]))
        r["speedup_vs_torch_fused"] = paired_speedup(baseline, times) if baseline else None
        clip_fused = r["optimizer"] == "fastcls max_grad_norm" and unfused_clip
        r["speedup_vs_clip_grad_norm_"] = paired_speedup(unfused_clip, times) if clip_fused else None
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", help=f"comma-separated from {sorted(MODELS)} (default per device: "
                                         f"{DEFAULT_MODELS})")
    parser.add_argument("--configs", help=f"comma-separated from {sorted(CONFIGS)} (default per device: "
                                          f"{DEFAULT_CONFIGS})")
    parser.add_argument("--steps", type=int, help=f"steps per timed run (default per device: {DEFAULT_STEPS})")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    models = (args.models or DEFAULT_MODELS[device.type]).split(",")
    for model in models:
        if model not in MODELS:
            sys.exit(f"--models: unknown model {model!r}; choose from {sorted(MODELS)}")
    for config in (args.configs or DEFAULT_CONFIGS[device.type]).split(","):
        if config not in CONFIGS:
            sys.exit(f"--configs: unknown config {config!r}; choose from {sorted(CONFIGS)}")
    args.steps = args.steps or DEFAULT_STEPS[device.type]
    generator = torch.Generator().manual_seed(0)
    backend = dispatch.pick_backend(device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    bytes_per_s, yardstick = streaming_bandwidth(device)
    configs = [CONFIGS[name] for name in (args.configs or DEFAULT_CONFIGS[device.type]).split(",")]
    rows = []
    for model in models:
        for dtype, master in configs:
            rows += bench_model(model, device, dtype, master, args, generator)
    reference_bw = bytes_per_s / 1e9
    for r in rows:
        r["pct_of_stream_bw"] = round(100 * r["GBps"] / reference_bw, 1)

    print(f"AdamW step, {card}, torch {torch.__version__}, fastcls backend {backend}, {time.strftime('%Y-%m-%d')}")
    print(f"streaming bandwidth: {reference_bw:.1f} GB/s, {yardstick} (% below is of it)")
    header = ["model", "params_M", "dtype", "optimizer", "lr", "ms_per_step", "GBps", "pct_of_stream_bw",
              "speedup_vs_torch_fused", "speedup_vs_clip_grad_norm_", "kernels_per_step"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join("" if r[h] is None else str(r[h]) for h in header) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": card, "torch": torch.__version__, "backend": backend,
                                               "bandwidth_GBps": reference_bw, "yardstick": yardstick, "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
