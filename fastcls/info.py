"""What `fastcls info` prints: versions, the device, and per op the backend that runs it and the dtypes it takes."""
import platform

import torch

import fastcls.optim  # noqa: F401  registers adamw's kernels for the table below
from fastcls.components.precision import bf16_is_fast
from fastcls.ops import dispatch, op_backends


def _version(module_name: str) -> str:
    try:
        return __import__(module_name).__version__
    except ImportError:
        return "not installed"


def describe() -> str:
    import fastcls

    lines = [
        f"fastcls       {fastcls.__version__}",
        f"python        {platform.python_version()}",
        f"torch         {torch.__version__}",
        f"triton        {_version('triton')}",
        f"transformers  {_version('transformers')}",
    ]
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
          f"{torch.backends.cpu.get_cpu_capability()}, bf16 {'yes' if bf16_is_fast(torch.device('cpu')) else 'no'}"
    lines.append(f"cpu           {cpu}")
    if torch.cuda.is_available():
        lines.append(f"cuda          {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, "
                     f"bf16 {'yes' if bf16_is_fast(torch.device('cuda')) else 'no'})")
    else:
        lines.append("cuda          not available")
    if dispatch.cpp_ext is not None:
        cpp = f"built, CPU variant {dispatch.CPP_BUILD.variant} ({dispatch.CPP_BUILD.reason})"
    else:
        cpp = f"not built ({dispatch.CPP_ERROR})"
    lines.append(f"C++ kernels   {cpp}")
    lines.append(f"Triton        {'importable' if dispatch.TRITON_ERROR is None else dispatch.TRITON_ERROR}")
    lines.append("")
    cells = {op: [f"{device}: {_backend_text(choice)}" for device, choice in by_device.items()]
             for op, by_device in op_backends().items()}
    op_width = max(len(op) for op in cells) + 2
    cell_width = max(len(row[0]) for row in cells.values()) + 2
    for op, row in cells.items():
        lines.append(f"{op:<{op_width}}{row[0]:<{cell_width}}{row[1]}")
    return "\n".join(lines)


def _backend_text(choice: dispatch.DeviceBackend) -> str:
    """cpp (fp32, bf16); the reference takes every dtype."""
    return f"{choice.backend} ({', '.join(choice.dtypes)})" if choice.dtypes else choice.backend
