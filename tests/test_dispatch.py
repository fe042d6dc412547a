"""Without the C++ build, every op still runs, on the PyTorch reference, and `fastcls info` says so."""
import torch

from fastcls.info import describe
from fastcls.ops import cross_entropy, dispatch, op_backends


def test_missing_cpp_build_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(dispatch, "cpp_ext", None)
    monkeypatch.setattr(dispatch, "CPP_ERROR", "No module named 'fastcls._C'")
    monkeypatch.delenv("FASTCLS_BACKEND", raising=False)
    assert dispatch.pick_backend(torch.device("cpu")) == "reference"
    assert all(by_device["cpu"] == "reference" for by_device in op_backends().values())
    logits = torch.randn(5, 3, requires_grad=True)
    target = torch.tensor([0, 2, 1, 1, 0])
    loss = cross_entropy(logits, target)
    loss.backward()
    expected = torch.nn.functional.cross_entropy(logits.detach().double(), target)
    torch.testing.assert_close(loss.double(), expected)
    assert "C++ kernels   not built (No module named 'fastcls._C')" in describe()


def test_environment_forces_the_reference(monkeypatch):
    monkeypatch.setenv("FASTCLS_BACKEND", "reference")
    assert dispatch.pick_backend(torch.device("cpu")) == "reference"
    assert op_backends()["cross_entropy"]["cpu"] == "reference"
