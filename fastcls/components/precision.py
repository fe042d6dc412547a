"""Device and mixed-precision choice: bf16 autocast where the hardware does bf16 matrix products."""
import contextlib
import dataclasses

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # oneDNN reports bf16 support only where the CPU has native bf16 dot products (AVX512-BF16, AMX)
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return name


# cuDNN's attention builds an execution plan for every new sequence length, and length-grouped batches bring a new
# length at most steps (MiniLM on an H200: 3x slower steps in bf16); the other kernels do not
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends():
    return sdpa_kernel(ATTENTION_BACKENDS)


def autocast(device: torch.device, precision: str):
    """Weights and the optimizer stay fp32; matrix products run in the low precision."""
    stack = contextlib.ExitStack()
    if precision != "fp32":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        stack.enter_context(torch.autocast(device_type=device.type, dtype=dtype))
    if device.type == "cuda":
        stack.enter_context(attention_backends())
    return stack


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (the scaler is then a no-op)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_device(batch, device: torch.device):
    """A padded batch (dict of tensors) or a PackedBatch, its tensors on `device`."""
    if device.type != "cuda":
        return batch

    def move(value):
        # a copy from pageable memory waits for the GPU to drain; from pinned memory it queues behind the work
        return value.pin_memory().to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value

    if isinstance(batch, dict):
        return {k: move(v) for k, v in batch.items()}
    return dataclasses.replace(batch, **{f.name: move(getattr(batch, f.name)) for f in dataclasses.fields(batch)})
