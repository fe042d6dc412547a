"""How much memory autograd keeps between a forward and its backward: the figure the mask-free kernels lower."""
from collections.abc import Callable

import torch
from torch import nn


def saved_activation_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `forward()` runs (the model's parameters excluded);
    runs the backward of `forward()`'s result summed, so the count covers one whole training step's activations."""
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    out.sum().backward()
    return sum(size for ptr, size in saved.items() if ptr not in parameters)
