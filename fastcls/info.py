"""What `fastcls info` prints: versions, the device, and which backend runs each op."""
import platform

import torch

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
    cpp = "built" if dispatch.cpp_ext is not None else f"not built ({dispatch.CPP_ERROR})"
    lines.append(f"C++ kernels   {cpp}")
    lines.append(f"Triton        {'importable' if dispatch.TRITON_ERROR is None else dispatch.TRITON_ERROR}")
    lines.append("")
    backends = op_backends()
    width = max(len(op) for op in backends) + 2
    lines.append(f"{'op':<{width}} {'cpu':<10} cuda")
    for op, by_device in backends.items():
        lines.append(f"{op:<{width}} {by_device['cpu']:<10} {by_device['cuda']}")
    return "\n".join(lines)
