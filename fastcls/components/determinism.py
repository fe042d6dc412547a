"""`--deterministic`: the same bits from the same settings, in one process or across a resume.

On the CPU, torch's kernels and fastcls's own (fastcls/csrc: rows and ranges split statically over the threads,
every reduction's order fixed by the thread count, never by scheduling) give the same bits for the same inputs
and thread count; the mode makes torch refuse (CUDA: warn about) an op without a deterministic implementation and
runs with the thread count a resumed run had. On CUDA it also sets cuDNN's deterministic algorithms and cuBLAS's
fixed workspace (a bitwise resume is claimed on the CPU only). Everything is restored on leaving."""
import contextlib
import os

import torch


def resolve_deterministic(deterministic: bool | None, device: torch.device) -> bool:
    """None = on for the CPU, where it costs nothing measurable (RESULTS.md), off on CUDA."""
    return device.type == "cpu" if deterministic is None else deterministic


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: torch.device, threads: int | None = None):
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                torch.utils.deterministic.fill_uninitialized_memory)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its handle
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    # that mode also NaN-fills every new tensor, a check for reads of uninitialized memory: fastcls makes none,
    # so it would cost time and change no result
    torch.utils.deterministic.fill_uninitialized_memory = False
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.set_num_threads(previous[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[3], previous[4]
        torch.utils.deterministic.fill_uninitialized_memory = previous[5]
