"""When the fused LayerNorm's output can stand in for its pre-norm sum in the backward (the memory design of
`fastcls.ops.dropout_add_layer_norm`): xhat = (y - bias) / weight is exact enough only where every column has
weight != 0 and |bias| <= MAX_BIAS_OVER_WEIGHT |weight|. The check reads the weight once per weight version; on
CUDA it runs behind the GPU's work and never waits for it.
"""
import weakref

import torch

from fastcls.ops import cpp, dispatch

# y = weight * xhat + bias is rounded to y's dtype: recovering xhat scales that error by |bias / weight|.
MAX_BIAS_OVER_WEIGHT = 64.0


def output_stands_in(weight, bias) -> bool:
    """Whether the backward may recover xhat from the output. Not inside torch.compile's trace or a CUDA graph
    capture: there the check's answer would be baked in for every later step, so the sum is saved (exact, only
    more memory)."""
    if torch.compiler.is_compiling() or (weight.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    return _xhat_recoverable_from_output(weight, bias)


_recoverable_cache: dict[int, "_RecoverableCheck"] = {}
# The answer a CUDA check may lend to later weight versions is computed with this much margin: |bias| within 16
# |weight| instead of 64, so a later version stays within the exact bound unless one optimizer step shrinks a
# LayerNorm weight or grows its bias fourfold (AdamW moves an element by about lr per step).
LENT_ANSWER_MARGIN = 4.0


class _RecoverableCheck:
    """One (weight, bias) pair's check, redone only when an optimizer step has changed their versions. On CUDA it
    runs asynchronously: its flag is copied to pinned host memory behind the GPU's work and read once the copy's
    event has completed, so no forward ever waits for it."""

    def __init__(self, weight, bias):
        self.weight_ref, self.bias_ref = weakref.ref(weight), weakref.ref(bias)
        self.versions = None  # the versions the pending or finished check looked at
        self.event = self.flag = None
        self.answer: bool | None = None  # the latest finished check's answer (with margin), whatever its version

    def current(self, weight, bias) -> bool:
        return self.weight_ref() is weight and self.bias_ref() is bias and self.versions == (weight._version,
                                                                                              bias._version)

    def collect(self) -> None:
        if self.event is not None and self.event.query():
            self.answer, self.event = bool(self.flag[0]), None


def _xhat_recoverable_from_output(weight, bias) -> bool:
    """Whether xhat = (y - bias) / weight is exact enough in every column (see the module docstring)."""
    check = _recoverable_cache.get(id(weight))
    if check is None or check.weight_ref() is not weight or check.bias_ref() is not bias:
        check = _recoverable_cache[id(weight)] = _RecoverableCheck(weight, bias)
    if weight.device.type == "cpu":  # reading the answer costs nothing here: the exact check, once per version
        if not check.current(weight, bias):
            check.versions, check.answer = (weight._version, bias._version), _recoverable(weight, bias)
        return check.answer
    # On CUDA reading the answer back would cost a host sync. Instead every LayerNorm's check runs behind the GPU's
    # work, all stale ones in one batch, and a forward uses the latest finished answer, which was computed with a
    # margin (LENT_ANSWER_MARGIN) so that it still holds a step later. Until a first answer arrives, the op saves
    # the pre-norm sum: always exact, only more memory.
    check.collect()
    if not check.current(weight, bias) and check.event is None:
        _launch_recoverable_checks(weight.device)
    return bool(check.answer)


def _launch_recoverable_checks(device) -> None:
    if len(_recoverable_cache) > 4096:
        _recoverable_cache.clear()
    stale = []
    for key, check in list(_recoverable_cache.items()):
        weight, bias = check.weight_ref(), check.bias_ref()
        if weight is None or bias is None:
            del _recoverable_cache[key]
        elif weight.device == device and check.event is None and not check.current(weight, bias):
            stale.append((check, weight, bias))
    with torch.no_grad():
        # one answer for all of them (a dozen launches a step, not a dozen per LayerNorm): a single failing column
        # anywhere makes every LayerNorm save its sum, which is exact, only larger
        flag = _recoverable_flag(torch.cat([w.detach().float().flatten() for _, w, _ in stale]),
                                 torch.cat([b.detach().float().flatten() for _, _, b in stale]),
                                 MAX_BIAS_OVER_WEIGHT / LENT_ANSWER_MARGIN)
        host = torch.empty(1, dtype=torch.bool, pin_memory=True)
        host.copy_(flag.reshape(1), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    for check, weight, bias in stale:
        check.versions, check.event, check.flag = (weight._version, bias._version), event, host


def _recoverable_flag(weight, bias, max_bias_over_weight: float = MAX_BIAS_OVER_WEIGHT) -> torch.Tensor:
    w, b = weight.float().abs(), bias.float().abs()
    return ((w > 0) & (b <= max_bias_over_weight * w) & torch.isfinite(w)).all()


def _recoverable(weight, bias) -> bool:
    # on the CPU one C++ loop: a dozen checks a step (each LayerNorm's weights change every step) as torch ops cost
    # ~1 ms of a MiniLM step
    if (weight.device.type == "cpu" and dispatch.cpp_ext is not None and weight.dim() == bias.dim() == 1
            and weight.dtype == bias.dtype and weight.dtype in cpp.LAYER_NORM_DTYPES and weight.is_contiguous()
            and bias.is_contiguous() and weight.shape == bias.shape):
        return cpp.layer_norm_output_recovers(weight.detach(), bias.detach(), MAX_BIAS_OVER_WEIGHT)
    with torch.no_grad():
        return bool(_recoverable_flag(weight, bias))
