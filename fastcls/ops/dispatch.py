"""Which implementation runs an op: Triton for CUDA tensors, C++ for CPU tensors, PyTorch otherwise.

`FASTCLS_BACKEND=reference` (or `backend="reference"` on a call) forces the PyTorch reference, which is
what tests and benchmarks compare the kernels against.
"""
import os
import warnings

import torch

BACKENDS = ("triton", "cpp", "reference")

try:
    from fastcls import _C as cpp_ext
    CPP_ERROR = None
except ImportError as err:  # the C++ build failed or was skipped at install
    cpp_ext = None
    CPP_ERROR = str(err)

try:
    import triton  # noqa: F401
    TRITON_ERROR = None
except ImportError as err:
    TRITON_ERROR = str(err)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device) -> bool:
    if TRITON_ERROR is not None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def pick_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend an op on `device` runs with; `backend` or FASTCLS_BACKEND overrides the choice."""
    forced = backend or os.environ.get("FASTCLS_BACKEND") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {forced!r}")
        if forced == "cpp" and (cpp_ext is None or device.type != "cpu"):
            warnings.warn(f"C++ kernels unavailable for {device.type} tensors; using the reference", stacklevel=3)
            return "reference"
        if forced == "triton" and not triton_usable(device):
            warnings.warn(f"Triton unavailable for {device.type} tensors; using the reference", stacklevel=3)
            return "reference"
        return forced
    if device.type == "cuda" and triton_usable(device):
        return "triton"
    if device.type == "cpu" and cpp_ext is not None:
        return "cpp"
    return "reference"
