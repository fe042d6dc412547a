"""The issue's target figures from the JSON files benchmarks/gpu_check.sh writes, as one markdown table: each target
with its measured value and PASS, FAIL or "not measured".

    python benchmarks/gpu_table.py [DIR]    (default: $OUT, else /tmp/fastcls_gpu_check)

Reads, where present: cross_entropy_cuda.json and layer_norm_cuda.json and adamw_cuda.json (the kernel
benchmarks' --json), e2e_minilm_cuda.json and e2e_bert_cuda.json (benchmarks/e2e.py --json, MiniLM and the
BERT-base-sized encoder; an e2e_cuda.json of earlier checks counts as the BERT-base one) and
launch_overhead_cuda.json (benchmarks/launch_overhead.py --json). A figure whose file or row is absent reads
"not measured". A run named twice in one e2e file counts with its faster row.
"""
import json
import os
import sys
from pathlib import Path

FILES = {"ce": "cross_entropy_cuda.json", "ln": "layer_norm_cuda.json", "adamw": "adamw_cuda.json",
         "minilm": "e2e_minilm_cuda.json", "bert": "e2e_bert_cuda.json", "launch": "launch_overhead_cuda.json"}
LEGACY_BERT = "e2e_cuda.json"
PASS, FAIL, NOT_MEASURED, INFO = "PASS", "FAIL", "not measured", "info"
LN_MIN_ELEMENTS = 8192 * 1024
LN_TARGET, CE_TARGET, CE_MIN_CLASSES = 70.0, 80.0, 32000
ADAMW_BW_TARGET, ADAMW_SPEEDUP_TARGET, ADAMW_MODEL = 90.0, 1.1, "bert-base"
MINILM_TARGET, BERT_TARGET = 1.5, 3.0
FASTCLS_E2E_RUNS = ("fastcls", "fastcls-graphs")


def load(folder: Path, name: str):
    path = folder / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"warning: {path} unreadable: {err}", file=sys.stderr)
        return None


def elements(shape: str) -> int:
    n = 1
    for part in shape.split("x"):
        n *= int(part)
    return n


def verdict(ok: bool) -> str:
    return PASS if ok else FAIL


def ratio_text(x: float) -> str:
    return f"{x:.2f}x"


# Each check returns a list of (target, measured, status) rows.


def ce_rows(data) -> list[dict]:
    return [r for r in (data or {}).get("rows", []) if r.get("op") == "cross_entropy"]


def adamw_kind(row: dict) -> str:
    """float32, bf16+master; with the lr's kind where bench_adamw reports it (lr float or a device tensor)."""
    return f"{row['dtype']} lr {row['lr']}" if row.get("lr") else row["dtype"]


def eager_comparisons(ln, ce, adamw) -> list[dict]:
    """Every shape the kernel benchmarks measured: op, shape, dtype and x (eager time / fastcls time: > 1 is
    fastcls faster)."""
    out = []
    for r in (ln or {}).get("rows", []):
        if r.get("kind") == "op" and r.get("impl") == "fastcls" and r.get("x vs eager") is not None:
            out.append({"op": "dropout+add+LayerNorm", "shape": r["shape"], "dtype": r["dtype"], "x": r["x vs eager"]})
    for r in (ce or {}).get("rows", []):
        eager = {"cross_entropy": "torch eager", "linear_cross_entropy": "torch plain"}.get(r.get("op"))
        if r.get("impl") == eager and r.get("fastcls_speedup") is not None:
            name = "cross-entropy" if r["op"] == "cross_entropy" else "linear+cross-entropy"
            out.append({"op": name, "shape": r["shape"], "dtype": r["dtype"], "x": r["fastcls_speedup"]})
    for r in (adamw or {}).get("rows", []):
        if r.get("optimizer") == "fastcls" and r.get("speedup_vs_torch_fused") is not None:
            out.append({"op": "AdamW vs torch fused", "shape": r["model"], "dtype": adamw_kind(r),
                        "x": r["speedup_vs_torch_fused"]})
    for c in out:
        c["label"] = f"{c['op']} {c['shape']} {c['dtype']}"
    return out


def launch_comparisons(launch) -> list[dict]:
    """Per launch_overhead row of a training-step op: x = eager loop time / fastcls loop time."""
    return [{"op": r["op"], "shape": r["shape"], "dtype": r.get("dtype"), "x": r["x_vs_eager"],
             "label": f"{r['op']} {r['shape']}"}
            for r in (launch or {}).get("rows", []) if r.get("x_vs_eager") is not None and r.get("train_step_op", True)]


def all_at_least(label: str, comparisons: list[dict], threshold: float = 1.0) -> tuple:
    if not comparisons:
        return (label, "-", NOT_MEASURED)
    slower = sorted((c for c in comparisons if c["x"] < threshold), key=lambda c: c["x"])
    worst = min(comparisons, key=lambda c: c["x"])
    text = f"{len(comparisons) - len(slower)}/{len(comparisons)} at or faster; worst {worst['label']} " \
           f"{ratio_text(worst['x'])}"
    if len(slower) > 1:
        text += "; also slower: " + ", ".join(f"{c['label']} {ratio_text(c['x'])}" for c in slower[1:4])
        if len(slower) > 4:
            text += f" and {len(slower) - 4} more"
    return (label, text, verdict(not slower))


def named_comparison(label: str, comparisons: list[tuple[str, float]]) -> tuple:
    if not comparisons:
        return (label, "-", NOT_MEASURED)
    text = ", ".join(f"{name} {ratio_text(x)}" for name, x in comparisons)
    return (label, text, verdict(all(x >= 1.0 for _, x in comparisons)))


def kernel_targets(ln, ce, adamw, launch) -> list[tuple]:
    rows = []
    bench = eager_comparisons(ln, ce, adamw)
    looped = launch_comparisons(launch)
    k2 = [(f"bench {c['shape']} {c['dtype']}", c["x"]) for c in bench
          if c["op"] == "cross-entropy" and c["shape"].split("x")[-1] == "2"]
    k2 += [(f"per call {c['shape']}", c["x"]) for c in looped if c["op"] == "cross_entropy K=2"]
    rows.append(named_comparison("cross-entropy K=2 at or faster than torch eager", k2))
    ln_4096 = [(f"bench {c['dtype']}", c["x"]) for c in bench
               if c["op"] == "dropout+add+LayerNorm" and c["shape"] == "4096x768"]
    ln_4096 += [(f"per call{' (generator)' if '+generator' in c['op'] else ''}", c["x"]) for c in looped
                if c["op"].startswith("dropout_add_layer_norm") and c["shape"] == "4096x768"]
    rows.append(named_comparison("dropout+add+LayerNorm 4096x768 at or faster than torch eager", ln_4096))
    rows.append(all_at_least("kernel benchmarks: every fastcls op at or faster than torch eager, every shape", bench))
    rows.append(all_at_least("per call (launch_overhead loop time): every op at or faster than torch eager", looped))

    ln_big = [r for r in (ln or {}).get("rows", []) if r.get("kind") == "op" and r.get("impl") == "fastcls"
              and elements(r["shape"]) >= LN_MIN_ELEMENTS]
    label = f"LayerNorm fwd+bwd >= {LN_TARGET:.0f}% of copy bandwidth at 8192x1024 and above"
    if ln_big:
        worst = min(ln_big, key=lambda r: r["% bw"])
        text = ", ".join(f"{r['shape']} {r['dtype']} {r['% bw']:.0f}%" for r in ln_big)
        rows.append((label, f"{text} (copy {ln.get('meta', {}).get('bandwidth_GBps', 0):.0f} GB/s)",
                     verdict(worst["% bw"] >= LN_TARGET)))
    else:
        rows.append((label, "-", NOT_MEASURED))

    ce_big = [r for r in ce_rows(ce) if r.get("impl") == "fastcls" and int(r["shape"].split("x")[-1]) >= CE_MIN_CLASSES]
    label = f"cross-entropy >= {CE_TARGET:.0f}% of copy bandwidth for K >= 32k"
    if ce_big:
        text = ", ".join(f"{r['shape']} {r['dtype']} {r['pct_bw']:.0f}%" for r in ce_big)
        rows.append((label, f"{text} (copy {ce.get('bandwidth_gb_s', 0):.0f} GB/s)",
                     verdict(min(r["pct_bw"] for r in ce_big) >= CE_TARGET)))
    else:
        rows.append((label, "-", NOT_MEASURED))

    fastcls_adamw = [r for r in (adamw or {}).get("rows", [])
                     if r.get("optimizer") == "fastcls" and r.get("model") == ADAMW_MODEL]
    for label, key, target, fmt in (
            (f"AdamW >= {ADAMW_BW_TARGET:.0f}% of copy bandwidth (BERT-base-sized)", "pct_of_stream_bw",
             ADAMW_BW_TARGET, "{:.0f}%"),
            (f"AdamW >= {ADAMW_SPEEDUP_TARGET}x torch.optim.AdamW(fused=True) (BERT-base-sized)",
             "speedup_vs_torch_fused", ADAMW_SPEEDUP_TARGET, "{:.2f}x")):
        measured = [r for r in fastcls_adamw if r.get(key) is not None]
        if measured:
            text = ", ".join(f"{adamw_kind(r)} {fmt.format(r[key])}" for r in measured)
            rows.append((label, text, verdict(min(r[key] for r in measured) >= target)))
        else:
            rows.append((label, "-", NOT_MEASURED))
    return rows


def best_rows(rows) -> dict[str, dict]:
    best = {}
    for r in rows or []:
        if isinstance(r, dict) and r.get("samples_per_s") is not None:
            if r["run"] not in best or r["samples_per_s"] > best[r["run"]]["samples_per_s"]:
                best[r["run"]] = r
    return best


def e2e_targets(minilm, bert) -> list[tuple]:
    rows = []
    m, b = best_rows(minilm), best_rows(bert)
    hf_measured = [name for name in ("hf-defaults", "hf-best") if name in m]
    for run in FASTCLS_E2E_RUNS:
        label = f"MiniLM: {run} >= {MINILM_TARGET}x the faster of hf-defaults and hf-best"
        if run not in m or not hf_measured:
            missing = [x for x in (run, "hf-defaults", "hf-best") if x not in m]
            rows.append((label, f"no row: {', '.join(missing)}", NOT_MEASURED))
            continue
        reference = max((m[name] for name in hf_measured), key=lambda r: r["samples_per_s"])
        x = m[run]["samples_per_s"] / reference["samples_per_s"]
        text = f"{ratio_text(x)} ({m[run]['samples_per_s']:.0f} against {reference['run']} " \
               f"{reference['samples_per_s']:.0f} samples/s)"
        if len(hf_measured) < 2:
            rows.append((label, text + f"; {({'hf-defaults', 'hf-best'} - set(hf_measured)).pop()} not measured",
                         NOT_MEASURED))
        else:
            rows.append((label, text, verdict(x >= MINILM_TARGET)))
    for run in FASTCLS_E2E_RUNS:
        label = f"BERT-base-sized: {run} >= {BERT_TARGET:.0f}x hf-best"
        if run not in b or "hf-best" not in b:
            missing = [x for x in (run, "hf-best") if x not in b]
            rows.append((label, f"no row: {', '.join(missing)}", NOT_MEASURED))
            continue
        x = b[run]["samples_per_s"] / b["hf-best"]["samples_per_s"]
        text = f"{ratio_text(x)} ({b[run]['samples_per_s']:.0f} against {b['hf-best']['samples_per_s']:.0f} samples/s)"
        rows.append((label, text, verdict(x >= BERT_TARGET)))
    for name, best in (("MiniLM", m), ("BERT-base-sized", b)):
        label = f"{name}: training tokens/s"
        if best:
            rows.append((label, ", ".join(f"{run} {r['tokens_per_s']:.0f}" for run, r in best.items()
                                          if r.get("tokens_per_s") is not None), INFO))
        else:
            rows.append((label, "-", NOT_MEASURED))
    for name, best in (("MiniLM", m), ("BERT-base-sized", b)):
        label = f"{name}: fraction of the step the GPU is busy (NVML)"
        busy = [f"{run} {r['gpu_busy']:.0%}" for run, r in best.items() if r.get("gpu_busy") is not None]
        rows.append((label, ", ".join(busy) if busy else "-", INFO if busy else NOT_MEASURED))
    return rows


def launch_targets(launch) -> list[tuple]:
    rows = []
    measured = [r for r in (launch or {}).get("rows", []) if r.get("fastcls") and r.get("train_step_op", True)]
    failed = [r for r in (launch or {}).get("rows", []) if r.get("error") and not r.get("fastcls")]
    errors = f"; {len(failed)} rows failed: {', '.join(r['op'] for r in failed[:3])}" if failed else ""
    for label, key, na_key in (("compiles per call = 0 on the training-step ops", "compiles_per_call", "compiles_na"),
                               ("host syncs per call = 0 on the training-step ops", "syncs_per_call", None)):
        values = [(f"{r['op']} {r['shape']}", r["fastcls"][key]) for r in measured
                  if r["fastcls"].get(key) is not None and not (na_key and r.get(na_key))]
        if not values:
            rows.append((label, "-" + errors, NOT_MEASURED))
            continue
        offenders = sorted((v for v in values if v[1] > 0), key=lambda v: -v[1])
        text = f"{len(values) - len(offenders)}/{len(values)} rows at 0"
        if offenders:
            text += "; " + ", ".join(f"{name} {x:.2f}" for name, x in offenders[:4])
        if key == "syncs_per_call":  # validate=True reads the targets back: the counting must see that sync
            check = [r for r in (launch or {}).get("rows", []) if not r.get("train_step_op", True) and r.get("fastcls")]
            if check and check[0]["fastcls"].get(key) is not None:
                text += f" (check: {check[0]['op']} counts {check[0]['fastcls'][key]:.2f})"
        rows.append((label, text + errors, verdict(not offenders)))
    return rows


def header(folder: Path, data: dict) -> str:
    device = next((d.get("device") or d.get("meta", {}).get("device") for d in data.values()
                   if isinstance(d, dict) and (d.get("device") or d.get("meta", {}).get("device"))), None)
    if device is None:
        e2e = next((d for d in (data.get("minilm"), data.get("bert")) if d), None)
        device = e2e[0].get("device_name") if e2e else "unknown device"
    return f"### Targets: {device} ({folder})"


def build(folder: Path) -> tuple[str, list[tuple]]:
    data = {key: load(folder, name) for key, name in FILES.items()}
    if data["bert"] is None:
        data["bert"] = load(folder, LEGACY_BERT)
    rows = kernel_targets(data["ln"], data["ce"], data["adamw"], data["launch"])
    rows += e2e_targets(data["minilm"], data["bert"])
    rows += launch_targets(data["launch"])
    missing = [name for key, name in FILES.items() if data[key] is None]
    title = header(folder, data)
    if missing:
        title += f"\nmissing: {', '.join(missing)}"
    return title, rows


def format_table(title: str, rows: list[tuple]) -> str:
    lines = [title, "", "| target | measured | status |", "| --- | --- | --- |"]
    lines += [f"| {target} | {measured} | {status} |" for target, measured, status in rows]
    counts = {s: sum(1 for r in rows if r[2] == s) for s in (PASS, FAIL, NOT_MEASURED)}
    lines.append("")
    lines.append(f"{counts[PASS]} pass, {counts[FAIL]} fail, {counts[NOT_MEASURED]} not measured")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    folder = Path(argv[0] if argv else os.environ.get("OUT", "/tmp/fastcls_gpu_check"))
    if not folder.is_dir():
        print(f"{folder}: no such folder", file=sys.stderr)
        return 2
    print(format_table(*build(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
