"""fastcls's kernel-backed ops as torch.library custom ops, and the same ops without the dispatcher in eager mode.

A custom op (namespace "fastcls", with a fake implementation and registered autograd) is what lets torch.compile
trace through a kernel call instead of breaking the graph there, and what `torch.library.opcheck` checks. Its
dispatch costs host time, though: ~50 us per dropout forward + backward on a CPU, twice the op's own overhead. So
`KernelOp` calls the registered op only while torch.compile traces, or while any tensor argument is a tensor
subclass (the fake and functional tensors of AOT autograd's tracing, e.g. of a backward, or a DTensor); in eager
mode (CUDA graph capture included,
which needs no dispatcher) the same implementation, setup_context and backward run inside a plain
`torch.autograd.Function`. Both paths run the same functions, so opcheck's verdict covers the eager path too.
"""
from collections.abc import Callable

import torch

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def traced(*args) -> bool:
    """Whether torch.compile traces, or a tensor among `args` is a subclass (a trace's fake or functional tensor,
    or a DTensor): where the registered op, not its implementation, must run."""
    return torch.compiler.is_compiling() or any(
        isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSORS for a in args)


class KernelOp:
    """`impl` (type-annotated, returning fresh tensors) as the custom op "fastcls::<name>" with `fake` as its meta
    implementation; `with_autograd(backward, setup_context)` makes it differentiable, as `register_autograd`."""

    def __init__(self, name: str, impl: Callable, fake: Callable):
        self.name, self.impl = name, impl
        self.op = torch.library.custom_op(f"fastcls::{name}", impl, mutates_args=())
        self.op.register_fake(fake)
        self.function: type[torch.autograd.Function] | None = None

    def with_autograd(self, backward: Callable, setup_context: Callable) -> "KernelOp":
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        self.function = type(f"{self.name}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})
        return self

    def __call__(self, *args):
        if traced(*args):
            return self.op(*args)
        if self.function is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.function.apply(*args)
        return self.impl(*args)
