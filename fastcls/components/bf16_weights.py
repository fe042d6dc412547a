"""bf16 weights for the CPU's matrix products, their fp32 masters in the optimizer.

Under bf16 autocast every forward casts each fp32 Linear weight to bf16 and every backward casts its bf16 weight
gradient back to fp32: on two CPU cores, about a tenth of a MiniLM step goes to those copies. In a CPU bf16 run
the encoder's trainable Linear weights and biases are instead stored in bf16, and FusedAdamW (`master_weights`)
keeps their fp32 masters, started from the exact fp32 weights, and writes the rounded bf16 copy in the pass that
updates them. Training is autocast's: the forward rounds the same fp32 values to bf16 the same way, the
gradients are the same bf16 values, and the update runs on the fp32 masters.

Everything outside the training step sees fp32: the cast modules' `state_dict()` returns the masters (a state-dict
hook), so checkpoints, resume files and exports hold fp32 weights, and `restore` gives the model its fp32 weights
back at the end of the run.

Not used (autocast as before) where a step would differ or nothing was measured: gradients accumulated over
micro-steps (their sum would be rounded to bf16 at each micro-step), DDP and FSDP (their reductions and shards),
an optimizer of the caller's (no masters), and CUDA. Frozen modules keep fp32: rounding them would change the
saved model.
"""
import functools

import torch
from torch import nn

from fastcls.optim import FusedAdamW
from fastcls.optim.adamw import MASTER_KEY


def applies(device: torch.device, precision: str, grad_accum: int, distributed: bool, custom_optimizer: bool) -> bool:
    return (device.type == "cpu" and precision == "bf16" and grad_accum == 1 and not distributed
            and not custom_optimizer)


def trainable_linears(model: nn.Module) -> list[nn.Linear]:
    """The encoder's (and task layers') Linear modules whose weights all train; the head stays fp32 (its kernel
    computes the logits in fp32 from them)."""
    bodies = [model.encoder] + ([model.task_layers] if getattr(model, "task_layers", None) is not None else [])
    return [m for body in bodies for m in body.modules()
            if isinstance(m, nn.Linear) and all(p.requires_grad for p in m.parameters())]


class Bf16Weights:
    """Casts `model`'s trainable Linear weights to bf16 with fp32 masters kept by `optimizer` (see the module
    doc); `restore()` puts the fp32 weights back."""

    def __init__(self, model: nn.Module, optimizer: FusedAdamW):
        if not all(group["master_weights"] for group in optimizer.param_groups):
            raise ValueError("Bf16Weights needs a FusedAdamW with master_weights=True")
        self.optimizer = optimizer
        self.params: list[nn.Parameter] = []
        self.hooks = []
        for module in trainable_linears(model):
            for param in module.parameters(recurse=False):
                if param.dtype == torch.float32:
                    master = param.detach().clone()
                    param.data = master.to(torch.bfloat16)
                    optimizer.state[param][MASTER_KEY] = master  # the first step keeps it (FusedAdamW's doc)
                    self.params.append(param)
            # a function, not the bound method: torch marks the hook with an attribute
            self.hooks.append(module.register_state_dict_post_hook(functools.partial(Bf16Weights._fp32_state, self)))

    def _fp32_state(self, module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
        for name, param in module.named_parameters(recurse=False):
            if prefix + name in state:
                state[prefix + name] = self.master(param)

    def master(self, param: nn.Parameter) -> torch.Tensor:
        return self.optimizer.state.get(param, {}).get(MASTER_KEY, param.detach().float())

    def restore(self) -> None:
        """The fp32 masters back into the model's parameters (their gradients dropped); the hooks removed."""
        for param in self.params:
            param.data = self.master(param).detach().clone()
            param.grad = None
        for hook in self.hooks:
            hook.remove()
        self.params, self.hooks = [], []
