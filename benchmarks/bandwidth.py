"""The yardstick every kernel benchmark divides by, measured in the same run as the figures it judges.

CPU: an in-place add of a scalar over 256 MiB of fp32 (the "large in-place add" of the issues); CUDA: a 1 GiB
device-to-device copy. Both count the bytes read plus the bytes written, as the kernels' figures do.
"""
import time

import torch


def streaming_bandwidth(device: torch.device, repeats: int = 10) -> tuple[float, str]:
    """(bytes per second, what was measured); the best of `repeats` passes after one warm-up."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 26)
    x = torch.ones(numel, device=device)
    if device.type == "cuda":
        y = torch.empty_like(x)
        run, what = (lambda: y.copy_(x)), "device copy"
    else:
        run, what = (lambda: x.add_(1.0)), "in-place add"
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * x.nbytes / best, f"{what} (read + write)"
