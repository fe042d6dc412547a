"""Keep freed host memory in the process for the next step instead of handing it back to the OS.

glibc serves large blocks (gradients, activations of long batches) with mmap and returns them with munmap
when freed, so every training step faults the same memory in again, page by page (about 1 us per 4 KiB
page on the development machines: some 10% of a MiniLM step on the CPU). Raising the mmap and trim
thresholds makes freed blocks reusable, as the tcmalloc/jemalloc preloads recommended for CPU training do.
"""
import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
# The largest value mallopt takes: a trim threshold at the mmap threshold still handed a freed 1 GiB block
# (a large-vocabulary gradient) back to the OS, and the next step faulted it in again.
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_host_memory() -> bool:
    """Returns whether the allocator was retuned (glibc on Linux only; elsewhere nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
