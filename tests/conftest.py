import os
import zlib

import pytest
import torch

# Without CUDA, Triton kernels can only run under its interpreter, which triton.jit picks when a kernel is
# defined: the variable has to be set before any test module imports fastcls.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(
    params=[("reference", "cpu"), ("cpp", "cpu"), ("triton", "cpu"), ("triton", "cuda")],
    ids=["reference", "cpp", "triton-interpreter", "triton-cuda"],
)
def backend(request):
    """(backend name, device) of one implementation; skipped where it is unavailable."""
    from fastcls.ops import (
        dispatch,  # imported late: TRITON_INTERPRET must be set first
    )

    name, device_type = request.param
    device = torch.device(device_type)
    if device_type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "cpp" and dispatch.cpp_ext is None:
        pytest.skip(f"C++ extension not built: {dispatch.CPP_ERROR}")
    if name == "triton" and not dispatch.triton_usable(device):
        pytest.skip(f"Triton unusable on {device_type}: {dispatch.TRITON_ERROR or 'TRITON_INTERPRET is not 1'}")
    return name, device


@pytest.fixture
def generator(request):
    """A generator seeded per test, so each test draws its own inputs reproducibly."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
