"""The op registry: each op's backend per device and the dtypes its kernels take, the reference for the rest, and
without the C++ build every op still runs, on the PyTorch reference, and `fastcls info` says so."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastcls.info import describe
from fastcls.ops import cpp, cross_entropy, cross_entropy_reference, dispatch, dropout, dropout_reference, op_backends

CPU = torch.device("cpu")


def test_missing_cpp_build_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(dispatch, "cpp_ext", None)
    monkeypatch.setattr(dispatch, "CPP_ERROR", "No module named 'fastcls._C_baseline'")
    monkeypatch.delenv("FASTCLS_BACKEND", raising=False)
    assert dispatch.pick_backend(CPU) == "reference"
    assert all(by_device["cpu"] == ("reference", ()) for by_device in op_backends().values())
    logits = torch.randn(5, 3, requires_grad=True)
    target = torch.tensor([0, 2, 1, 1, 0])
    loss = cross_entropy(logits, target)
    loss.backward()
    expected = torch.nn.functional.cross_entropy(logits.detach().double(), target)
    torch.testing.assert_close(loss.double(), expected)
    assert "C++ kernels   not built (No module named 'fastcls._C_baseline')" in describe()


def test_environment_forces_the_reference(monkeypatch):
    monkeypatch.setenv("FASTCLS_BACKEND", "reference")
    assert dispatch.pick_backend(CPU) == "reference"
    assert dispatch.backend_for("dropout", CPU, torch.float32) == "reference"
    assert op_backends()["cross_entropy"]["cpu"].backend == "reference"


@pytest.fixture
def cpp_by_default(monkeypatch):
    """CPU tensors on their default backend, the C++ kernels (skipped where they are not built)."""
    monkeypatch.delenv("FASTCLS_BACKEND", raising=False)
    if dispatch.cpp_ext is None:
        pytest.skip(f"C++ extension not built: {dispatch.CPP_ERROR}")


def test_op_backends_reports_each_ops_dtypes(cpp_by_default):
    backends = op_backends()  # fastcls.info imported fastcls.optim, which registers adamw
    assert backends["dropout"]["cpu"] == ("cpp", ("fp32", "bf16"))
    assert backends["cross_entropy"]["cpu"] == ("cpp", ("fp32", "bf16", "fp16"))
    assert backends["adamw"]["cpu"] == ("cpp", ("fp32", "bf16+master"))
    if dispatch.TRITON_ERROR is None:
        assert backends["dropout"]["cuda"] == ("triton", ("fp32", "bf16", "fp16"))
    assert "cpu: cpp (fp32, bf16)" in next(line for line in describe().splitlines() if line.startswith("dropout "))


def test_a_dtype_the_kernels_do_not_take_runs_the_reference(cpp_by_default, monkeypatch):
    assert dispatch.backend_for("dropout", CPU, torch.bfloat16) == "cpp"
    assert dispatch.backend_for("dropout", CPU, torch.float16) == "reference"
    assert dispatch.backend_for("dropout", CPU, torch.float16, backend="cpp") == "reference"
    assert dispatch.backend_for("cross_entropy", CPU, torch.float16) == "cpp"
    assert dispatch.backend_for("cross_entropy", CPU, torch.float64) == "reference"

    def no_kernel(*args):
        raise AssertionError("the C++ kernel ran for a dtype it does not take")

    monkeypatch.setattr(cpp, "dropout", no_kernel)
    monkeypatch.setattr(cpp, "cross_entropy_rows", no_kernel)
    x = torch.randn(1000, dtype=torch.float16, requires_grad=True)
    out = dropout(x, 0.3, seed=5)
    assert torch.equal(out, dropout_reference(x, 0.3, 5))
    assert "dropout_function" in type(out.grad_fn).__name__  # still the mask-free op
    logits = torch.randn(6, 4, dtype=torch.float64)
    target = torch.tensor([0, 3, 1, 2, 2, 0])
    assert torch.equal(cross_entropy(logits, target), cross_entropy_reference(logits, target))


KERNEL_MODULES = ["fastcls.kernels.adamw", "fastcls.kernels.cross_entropy", "fastcls.kernels.dropout",
                  "fastcls.kernels.layer_norm", "fastcls.kernels.multi_task_cross_entropy"]
OP_LAYER_MODULES = KERNEL_MODULES + [
    "fastcls.ops", "fastcls.ops.bias_gelu", "fastcls.ops.classification_head", "fastcls.ops.cpp", "fastcls.ops.cpu_variant",
    "fastcls.ops.cross_entropy", "fastcls.ops.dispatch", "fastcls.ops.dropout", "fastcls.ops.dropout_add_layer_norm",
    "fastcls.ops.embedding", "fastcls.ops.linear", "fastcls.ops.linear_cross_entropy",
    "fastcls.ops.multi_task_cross_entropy",
    "fastcls.ops.multi_task_head", "fastcls.ops.varlen_attention",
    "fastcls.optim", "fastcls.optim.adamw", "fastcls.optim.adamw_table", "fastcls.optim.row_sparse",
]
# Imports each module first in a clean slate of fastcls modules (the built extensions stay loaded: one cannot be
# loaded twice), so that an import cycle shows as an ImportError, and lists the op-layer modules it pulled in.
IMPORT_EACH_FIRST = """
import importlib, json, sys
pulled_in = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] == "fastcls" and not m.startswith("fastcls._C_")]:
        del sys.modules[loaded]
    importlib.import_module(name)
    pulled_in[name] = sorted(m for m in sys.modules if m.startswith(("fastcls.ops", "fastcls.optim")))
print(json.dumps(pulled_in))
"""


def test_op_layer_imports_without_cycles_and_kernels_import_no_ops():
    if dispatch.TRITON_ERROR is not None:
        pytest.skip(f"Triton not importable: {dispatch.TRITON_ERROR}")
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST, *OP_LAYER_MODULES], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    pulled_in = json.loads(result.stdout)
    assert {name: pulled_in[name] for name in KERNEL_MODULES} == {name: [] for name in KERNEL_MODULES}
