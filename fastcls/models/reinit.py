"""Re-drawing the top layers of a pretrained encoder from its own initialiser (`--reinit-layers N`; Zhang et al.
2021, "Revisiting few-sample BERT fine-tuning"): the top layers are the most specific to the pretraining task, and
with little labelled data starting them afresh helps fine-tuning.

The initialiser is the encoder's transformers one, `PreTrainedModel._init_weights`, applied to every module of
those layers (normal(0, initializer_range) for linear weights, zero biases, LayerNorm weights 1 and biases 0, or
the family's own rules). transformers 5 marks loaded tensors `_is_hf_initialized` and its init functions skip
them, so the mark is cleared on the tensors to re-draw first. The draws come from a random stream of their own,
derived from --seed: the same on every rank and in every process, and sharing no numbers with the head's draws.
"""
import numpy as np
import torch
from torch import nn

from fastcls.errors import ConfigError
from fastcls.models.families import encoder_layers

_STREAM = 0x7265696E  # the stream's key beside the seed ("rein")


def reinit_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, _STREAM]).generate_state(1, np.uint64)[0] >> 1)


def reinit_top_layers(encoder: nn.Module, count: int, seed: int, frozen_layers: int = 0) -> None:
    """Re-draw the top `count` layers of `encoder` (in place, before the classifier takes it: task layers then
    copy the re-drawn ones). `frozen_layers`: the --freeze-layers count, which must leave the re-drawn layers
    trainable."""
    if not count:
        return
    init = getattr(encoder, "_init_weights", None)
    if not callable(init):
        raise ConfigError(f"--reinit-layers: {type(encoder).__name__} has no initialiser of its own (transformers' "
                          "_init_weights) to re-draw its layers from")
    try:
        layers = encoder_layers(encoder)
    except ValueError as err:
        raise ConfigError(f"--reinit-layers: {err}") from None
    total = len(layers)
    if count > total:
        raise ConfigError(f"--reinit-layers {count}: {type(encoder).__name__} has {total} layers")
    if frozen_layers + count > total:
        raise ConfigError(f"--reinit-layers {count} with --freeze-layers {frozen_layers}: the re-drawn layers must "
                          f"train, and only the top {total - frozen_layers} of {total} layers are not frozen")
    cuda = sorted({p.device for p in encoder.parameters() if p.is_cuda}, key=str)
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(reinit_seed(seed))
        for module in (m for layer in layers[total - count:] for m in layer.modules()):
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                tensor._is_hf_initialized = False
            init(module)
