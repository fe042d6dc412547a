"""Checks of benchmarks/launch_overhead.py and benchmarks/gpu_table.py that run on the CPU.

    python -m pytest -q benchmarks/test_launch_overhead.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_table  # noqa: E402
import launch_overhead  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "launch_overhead.py"
QUICK = ["--device", "cpu", "--sizes", "small", "--reps", "3", "--min-reps", "2", "--warmup", "1", "--budget-ms", "5"]


def test_the_cpu_table_has_a_row_per_op_with_both_sides(tmp_path, capsys):
    out = tmp_path / "lo.json"
    assert launch_overhead.main([*QUICK, "--ops", "dropout,cross_entropy K=2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["dropout", "cross_entropy K=2"]
    for r in rows:
        assert r["error"] is None and r["fastcls"]["host_us"] > 0 and r["eager"]["host_us"] > 0
        assert r["fastcls"]["compiles_per_call"] is None or r.get("compiles_na")  # no Triton kernel on the CPU
    assert "| dropout | 512x384 |" in capsys.readouterr().out


def test_a_failing_op_reports_in_its_row_and_the_others_go_on(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setitem(launch_overhead.OPS, "dropout", (broken, "act", {}, True))
    out = tmp_path / "lo.json"
    assert launch_overhead.main([*QUICK, "--ops", "dropout,layer_norm_dropout", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["error"] == "RuntimeError: kernel exploded" and rows[0]["fastcls"] is None
    assert rows[1]["error"] is None and rows[1]["fastcls"]["host_us"] > 0
    assert "ERROR RuntimeError: kernel exploded" in capsys.readouterr().out


@pytest.mark.skipif(launch_overhead._triton() is None, reason="triton not installed")
def test_the_compile_counter_sees_a_compilation_by_hook_and_by_cache_size():
    """What JITFunction._do_compile does once it has compiled, done by hand (no GPU here): the kernel lands in
    its device's cache, then the post-compile hook runs."""
    if launch_overhead.interpreter_active():
        pytest.skip("the interpreter's kernels keep no cache")
    counter = launch_overhead.CompileCounter()
    name, fn = next((n, f) for n, f in counter.functions.items() if type(f).__name__ == "JITFunction")
    owner, attribute = counter.hook_place
    before = getattr(owner, attribute)
    from triton.runtime.jit import JitFunctionInfo

    fake_device = "fake-device"
    with counter.active() as seen:
        fn.device_caches[fake_device] = ({}, {}, None, None, None)
        fn.device_caches[fake_device][0]["key"] = object()
        hook = getattr(owner, attribute)
        assert hook(key="key", repr=f"{fn.fn.__qualname__}[num_warps=4](x: *fp32)",
                    fn=JitFunctionInfo(fn.module, fn.fn.__qualname__, fn), compile={}, is_manual_warmup=False,
                    already_compiled=False) is None  # a true value would skip the compilation
    del fn.device_caches[fake_device]
    assert getattr(owner, attribute) is before  # the hook was put back
    assert counter.method == "triton.knobs.runtime.jit_post_compile_hook"
    assert seen["hooked"] == 1 and seen["cache_growth"] == 1
    assert seen["names"] == {fn.fn.__qualname__: 1}, name


def test_under_the_interpreter_the_triton_rows_run_and_report_compiles_as_na(tmp_path):
    out = tmp_path / "lo.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--backend", "triton", "--sizes", "tiny",
                           "--ops", "dropout,cross_entropy K=2", "--reps", "2", "--min-reps", "1", "--warmup", "1",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["meta"]["interpreter"] is True
    for r in data["rows"]:
        assert r["error"] is None and r["backend"] == "triton"
        assert r["compiles_na"] == "Triton interpreter: nothing is compiled"
    assert "| dropout | 8x64 | triton |" in proc.stdout and "n/a" in proc.stdout


# gpu_table ---------------------------------------------------------------------------------------------------------


def launch_row(op, shape, x, compiles=0.0, syncs=0.0, train=True):
    return {"op": op, "shape": shape, "train_step_op": train, "backend": "triton", "error": None, "x_vs_eager": x,
            "fastcls": {"host_us": 50.0, "loop_us": 50.0, "compiles_per_call": compiles, "syncs_per_call": syncs},
            "eager": {"host_us": 50.0 * x, "loop_us": 50.0 * x}}


def write_synthetic(folder: Path, *, minilm_ratio=2.0, syncs=0.0) -> None:
    """Files shaped as the benchmarks write them (see each script's --json)."""
    (folder / "layer_norm_cuda.json").write_text(json.dumps({"meta": {"device": "NVIDIA H200", "bandwidth_GBps": 4000},
        "rows": [
            {"kind": "op", "shape": "4096x768", "dtype": "bfloat16", "impl": "fastcls", "ms": 0.75, "GB/s": 60,
             "% bw": 1.5, "x vs eager": 0.37},
            {"kind": "op", "shape": "8192x1024", "dtype": "bfloat16", "impl": "fastcls", "ms": 0.1, "GB/s": 3000,
             "% bw": 75.0, "x vs eager": 2.0},
            {"kind": "op", "shape": "8192x1024", "dtype": "bfloat16", "impl": "torch eager", "ms": 0.2, "GB/s": 1500,
             "% bw": 37.5, "x vs eager": 1.0},
            {"kind": "model", "model": "BERT-base", "impl": "unpatched", "ms": 30.0}]}))
    (folder / "cross_entropy_cuda.json").write_text(json.dumps({"device": "NVIDIA H200", "bandwidth_gb_s": 4000,
        "rows": [
            {"op": "cross_entropy", "shape": "8192x2", "dtype": "float32", "impl": "fastcls", "ms": 0.8, "pct_bw": 0.1,
             "fastcls_speedup": 1.0},
            {"op": "cross_entropy", "shape": "8192x2", "dtype": "float32", "impl": "torch eager", "ms": 0.3,
             "pct_bw": 0.2, "fastcls_speedup": 0.375},
            {"op": "cross_entropy", "shape": "8192x32768", "dtype": "bfloat16", "impl": "fastcls", "ms": 0.3,
             "pct_bw": 85.0, "fastcls_speedup": 1.0},
            {"op": "cross_entropy", "shape": "8192x32768", "dtype": "bfloat16", "impl": "torch eager", "ms": 0.9,
             "pct_bw": 28.0, "fastcls_speedup": 3.0},
            {"op": "linear_cross_entropy", "shape": "16384x768x30522", "dtype": "bfloat16", "impl": "torch plain",
             "ms": 9.0, "extra_mb": 2000, "fastcls_speedup": 1.2}]}))
    (folder / "adamw_cuda.json").write_text(json.dumps({"device": "NVIDIA H200", "bandwidth_GBps": 4000, "rows": [
        {"model": "bert-base", "dtype": "float32", "optimizer": "fastcls", "ms_per_step": 0.8, "GBps": 3800,
         "pct_of_stream_bw": 95.0, "speedup_vs_torch_fused": 1.3},
        {"model": "bert-base", "dtype": "float32", "optimizer": "torch fused", "ms_per_step": 1.04, "GBps": 2900,
         "pct_of_stream_bw": 73.0, "speedup_vs_torch_fused": 1.0}]}))
    e2e = {"epochs": 1, "train_s": 5.0, "accuracy": 0.8, "frozen": None, "wall_s": 20, "peak_mb": 500,
           "device_name": "NVIDIA H200", "torch": "2.11"}
    (folder / "e2e_minilm_cuda.json").write_text(json.dumps([
        {**e2e, "run": "fastcls", "samples_per_s": 1000.0 * minilm_ratio, "tokens_per_s": 30000, "gpu_busy": 0.4},
        {**e2e, "run": "hf-defaults", "samples_per_s": 1000.0, "tokens_per_s": 15000, "gpu_busy": 0.3},
        {**e2e, "run": "hf-best", "samples_per_s": 500.0, "tokens_per_s": 7000, "gpu_busy": None}]))
    (folder / "launch_overhead_cuda.json").write_text(json.dumps({"meta": {"device": "NVIDIA H200"}, "rows": [
        launch_row("cross_entropy K=2", "32x2", 0.4, syncs=syncs),
        launch_row("dropout_add_layer_norm", "4096x768", 1.1),
        launch_row("cross_entropy K=2 validate", "32x2", 0.4, syncs=1.0, train=False)]}))


def table_rows(folder: Path) -> dict[str, tuple]:
    _, rows = gpu_table.build(folder)
    return {target: (measured, status) for target, measured, status in rows}


def test_the_table_judges_each_target_from_the_benchmarks_files(tmp_path):
    write_synthetic(tmp_path)
    rows = table_rows(tmp_path)
    assert rows["cross-entropy K=2 at or faster than torch eager"] == (
        "bench 8192x2 float32 0.38x, per call 32x2 0.40x", "FAIL")
    measured, status = rows["dropout+add+LayerNorm 4096x768 at or faster than torch eager"]
    assert status == "FAIL" and "bench bfloat16 0.37x" in measured and "per call 1.10x" in measured
    assert rows["LayerNorm fwd+bwd >= 70% of copy bandwidth at 8192x1024 and above"][1] == "PASS"
    assert rows["cross-entropy >= 80% of copy bandwidth for K >= 32k"][1] == "PASS"
    assert rows["AdamW >= 90% of copy bandwidth (BERT-base-sized)"] == ("float32 95%", "PASS")
    assert rows["AdamW >= 1.1x torch.optim.AdamW(fused=True) (BERT-base-sized)"] == ("float32 1.30x", "PASS")
    measured, status = rows["MiniLM: fastcls >= 1.5x the faster of hf-defaults and hf-best"]
    assert status == "PASS" and measured.startswith("2.00x") and "hf-defaults" in measured  # the faster Trainer run
    assert rows["MiniLM: fastcls-graphs >= 1.5x the faster of hf-defaults and hf-best"][1] == "not measured"
    assert rows["BERT-base-sized: fastcls >= 3x hf-best"][1] == "not measured"
    assert rows["MiniLM: fraction of the step the GPU is busy (NVML)"] == ("fastcls 40%, hf-defaults 30%", "info")
    assert rows["compiles per call = 0 on the training-step ops"] == ("2/2 rows at 0", "PASS")
    measured, status = rows["host syncs per call = 0 on the training-step ops"]
    assert status == "PASS" and "check: cross_entropy K=2 validate counts 1.00" in measured


def test_a_sync_or_a_slow_run_fails_and_missing_files_read_not_measured(tmp_path):
    write_synthetic(tmp_path, minilm_ratio=1.2, syncs=2.0)
    (tmp_path / "adamw_cuda.json").unlink()
    rows = table_rows(tmp_path)
    assert rows["MiniLM: fastcls >= 1.5x the faster of hf-defaults and hf-best"][1] == "FAIL"
    assert rows["host syncs per call = 0 on the training-step ops"][1] == "FAIL"
    assert rows["AdamW >= 90% of copy bandwidth (BERT-base-sized)"] == ("-", "not measured")
    title, _ = gpu_table.build(tmp_path)
    assert "missing: adamw_cuda.json" in title
    empty = tmp_path / "empty"
    empty.mkdir()
    assert {status for _, status in table_rows(empty).values()} == {"not measured"}
