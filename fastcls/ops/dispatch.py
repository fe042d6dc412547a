"""Which implementation runs an op: the registry of every op's kernels and the dtypes each takes.

Each op module registers its op once (`register_op`): the backends it has kernels for and the dtypes (or dtype
keys, such as AdamW's parameter dtype paired with "master") each backend's kernels take. A backend runs the
tensors of its devices: triton CUDA tensors (and CPU tensors under TRITON_INTERPRET=1), cpp CPU tensors. By
default a CUDA tensor goes to triton and a CPU tensor to cpp, where built or installed; `backend_for` answers for
one call, falling back to the PyTorch reference where the backend is missing or its kernels do not take a dtype.
The cpp kernels are those of the CPU variant `cpu_variant.load` picks (FASTCLS_CPU_VARIANT can force one).

`FASTCLS_BACKEND=reference` (or `backend="reference"` on a call) forces the PyTorch reference, which is
what tests and benchmarks compare the kernels against; forcing a backend unavailable for the device warns and
runs the reference.
"""
import os
import warnings
from collections.abc import Hashable, Iterable
from typing import NamedTuple

import torch

from fastcls.ops import cpu_variant

BACKENDS = ("triton", "cpp", "reference")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# the C++ kernels of the best CPU variant this machine runs (fastcls.ops.cpu_variant), or None where not built
CPP_BUILD = cpu_variant.load()
cpp_ext = CPP_BUILD.module
CPP_ERROR = None if cpp_ext is not None else CPP_BUILD.reason
if cpp_ext is None:
    # pip shows the install's warning about a failed build only with -v: say it where it matters
    warnings.warn(f"fastcls: the C++ kernels are not built ({CPP_ERROR}); CPU ops run on the PyTorch reference. "
                  "`pip install -v` shows why the build failed; FASTCLS_REQUIRE_CPP=1 makes it fail the install.",
                  stacklevel=2)

try:
    import triton  # noqa: F401
    TRITON_ERROR = None
except ImportError as err:
    TRITON_ERROR = str(err)

# op -> backend -> the dtype keys its kernels take, in registration order
_KERNEL_DTYPES: dict[str, dict[str, tuple[Hashable, ...]]] = {}
# takes()'s answers: asked before every kernel call, with a handful of distinct arguments
_TAKES: dict[tuple, bool] = {}


def triton_usable(device: torch.device) -> bool:
    if TRITON_ERROR is not None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def register_op(op: str, **dtypes_by_backend: Iterable[Hashable]) -> None:
    """Declare `op`'s kernels, e.g. register_op("dropout", cpp=(torch.float32, torch.bfloat16), triton=...):
    for each kernel backend, the dtype keys (dtypes, or tuples such as (torch.bfloat16, "master")) it takes."""
    unknown = set(dtypes_by_backend) - {"triton", "cpp"}
    if unknown:
        raise ValueError(f"{op}: kernel backends are 'triton' and 'cpp', got {sorted(unknown)}")
    _KERNEL_DTYPES[op] = {backend: tuple(dict.fromkeys(keys)) for backend, keys in dtypes_by_backend.items()}
    _TAKES.clear()


def kernel_dtypes(op: str) -> dict[str, tuple[Hashable, ...]]:
    """The dtype keys each of `op`'s kernel backends takes, as registered: for an op that runs another's kernels."""
    return dict(_KERNEL_DTYPES[op])


def pick_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend ops on `device` run with, before any op's dtypes are considered; `backend` or FASTCLS_BACKEND
    overrides the choice."""
    return _device_backend(device, backend, stacklevel=3)


def _device_backend(device: torch.device, backend: str | None, stacklevel: int) -> str:
    forced = backend or os.environ.get("FASTCLS_BACKEND") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {forced!r}")
        if forced == "cpp" and (cpp_ext is None or device.type != "cpu"):
            warnings.warn(f"C++ kernels unavailable for {device.type} tensors; using the reference",
                          stacklevel=stacklevel)
            return "reference"
        if forced == "triton" and not triton_usable(device):
            warnings.warn(f"Triton unavailable for {device.type} tensors; using the reference", stacklevel=stacklevel)
            return "reference"
        return forced
    if device.type == "cuda" and triton_usable(device):
        return "triton"
    if device.type == "cpu" and cpp_ext is not None:
        return "cpp"
    return "reference"


def takes(op: str, backend: str, *dtypes: Hashable | None) -> bool:
    """Whether `backend` has kernels for `op` that take every one of `dtypes` (None stands for an absent tensor);
    never true of the reference, which has no kernels."""
    key = (op, backend, dtypes)
    answer = _TAKES.get(key)
    if answer is None:
        kernel_dtypes = _KERNEL_DTYPES[op].get(backend)
        answer = _TAKES[key] = kernel_dtypes is not None and all(
            dtype is None or dtype in kernel_dtypes for dtype in dtypes)
    return answer


def backend_for(op: str, device: torch.device, *dtypes: Hashable | None, backend: str | None = None) -> str:
    """The backend that runs `op` on `device` for tensors of `dtypes` (None: an absent tensor; none given: the
    op's backend on `device` whatever the dtypes): "reference" where forced, where the device's backend is
    unavailable or has no kernels for `op`, or where those kernels do not take one of `dtypes`. `backend` or
    FASTCLS_BACKEND forces a backend, as in `pick_backend`."""
    chosen = _device_backend(device, backend, stacklevel=4)
    return chosen if takes(op, chosen, *dtypes) else "reference"


def dtype_name(key: Hashable) -> str:
    """fp32, bf16, ... for a dtype; the names of its parts joined by "+" for a tuple key (bf16+master)."""
    if isinstance(key, tuple):
        return "+".join(dtype_name(part) for part in key)
    if isinstance(key, torch.dtype):
        return DTYPE_NAMES.get(key, str(key).removeprefix("torch."))
    return str(key)


class DeviceBackend(NamedTuple):
    """What runs an op's tensors of one device: the backend, and the dtypes its kernels take (the reference: ())."""
    backend: str
    dtypes: tuple[str, ...]


def op_backends() -> dict[str, dict[str, DeviceBackend]]:
    """Per registered op (those of fastcls.ops, and adamw once fastcls.optim is imported), what runs its CPU and
    its CUDA tensors in this process, e.g. {"dropout": {"cpu": DeviceBackend("cpp", ("fp32", "bf16")), "cuda":
    ...}}; reflects FASTCLS_BACKEND and what was built or installed. Other dtypes run the reference."""
    report = {}
    with warnings.catch_warnings():
        # A forced backend that is unavailable warns at pick time; here the answer itself says so.
        warnings.simplefilter("ignore")
        for op in sorted(_KERNEL_DTYPES):
            report[op] = {}
            for device_type in ("cpu", "cuda"):
                backend = backend_for(op, torch.device(device_type))
                dtypes = _KERNEL_DTYPES[op].get(backend, ())
                report[op][device_type] = DeviceBackend(backend, tuple(dtype_name(key) for key in dtypes))
    return report
