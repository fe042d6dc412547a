"""The classifier: a pretrained encoder and fastcls's head on its pooled vector ([CLS], or the mean of the tokens:
`--pooling`), with one `forward(batch)`.

    loss, logits = model(batch)      # batch: a PaddedBatch or PackedBatch (fastcls.data.collate)

A multi-task classifier (`tasks`) has one head per task, run as one (`MultiTaskHead`): its logits are the tasks'
side by side, [rows, sum K_t], and its batches carry a label per task, [rows, T]. With `tasks.task_layers` = K,
each task has its own copy of the top K encoder layers (`fastcls.models.task_layers`), run batched across tasks.

The same forward serves training, evaluation and prediction, on the layout `model.packed` names, so a model is
evaluated by the code that trained it. Freezing, gradient checkpointing and the frozen-prefix cache live in the
encoder part (`fastcls.models.encoder`); `train()` keeps frozen modules in eval mode, so they never drop out.
"""
import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from fastcls.config import POOLINGS
from fastcls.data import Batch
from fastcls.errors import ConfigError
from fastcls.models.attention import sdpa_backends
from fastcls.models.encoder import LayerwiseEncoder, encoder_body
from fastcls.models.families import encoder_embeddings, encoder_layers
from fastcls.models.head import ClassificationHead, MultiTaskHead


def hidden_size_of(encoder: nn.Module) -> int:
    size = getattr(getattr(encoder, "config", None), "hidden_size", None) or getattr(encoder, "hidden_size", None)
    if not isinstance(size, int):
        raise ConfigError(f"cannot tell the hidden size of {type(encoder).__name__}: give it a "
                          "`config.hidden_size` (as transformers models have) or a `hidden_size` attribute")
    return size


def choose_packed(unpad: str, encoder: nn.Module, device: torch.device, wants_cache: bool = False) -> bool:
    """Whether to run unpadded batches: `--unpad on`, or `auto` on the CPU, and on CUDA only where the frozen-prefix
    cache needs it (on an H200 the unpadded path's gathers made launch-bound BERT-base steps slower); only
    encoders that run layer by layer can."""
    if not LayerwiseEncoder.supports(encoder):
        if unpad == "on":
            raise ConfigError(f"--unpad on: {type(encoder).__name__} runs through its own forward, on padded "
                              "batches only")
        return False
    return unpad == "on" or (unpad == "auto" and (device.type == "cpu" or wants_cache))


@dataclass
class Tasks:
    """A multi-task classifier's tasks: names, classes per task, loss weights (None: 1 / number of tasks),
    learned uncertainty weighting instead, and the top layers each task has its own copy of."""
    names: list[str]
    num_labels: list[int]
    weights: list[float] | None = None
    uncertainty: bool = False
    task_layers: int = 0


class EncoderClassifier(nn.Module):
    """`encoder`: a Hugging Face encoder (AutoModel) or any module taking input_ids and attention_mask (see
    `OwnForwardEncoder`). `kernels`: fastcls's kernels in the encoder (else PyTorch's ops); `packed`: run on
    unpadded batches (only where the encoder runs layer by layer); `tasks`: a multi-task classifier (then
    `num_labels` is ignored); `pooling`: what the head reads, h_CLS ("cls") or the mean of each row's tokens
    ("mean")."""

    def __init__(self, encoder: nn.Module, num_labels: int | None, dropout: float, *, head_impl: str = "fused",
                 kernels: bool = True, packed: bool = False, tasks: Tasks | None = None, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if isinstance(getattr(encoder, "pooler", None), nn.Module):
            encoder.pooler = None  # the head pools itself; BERT-like forwards skip a None pooler
        self.encoder, self.tasks, self.pooling = encoder, tasks, pooling
        config = getattr(encoder, "config", None)
        init_std = getattr(config, "initializer_range", 0.02)
        if tasks is None:
            self.head = ClassificationHead(hidden_size_of(encoder), num_labels, dropout, head_impl, init_std=init_std)
        else:
            self.head = MultiTaskHead(hidden_size_of(encoder), tasks.num_labels, dropout, head_impl, init_std,
                                      tasks.weights, tasks.uncertainty)
        self.task_layers = None
        if tasks is not None and tasks.task_layers:
            from fastcls.models.task_layers import TaskLayers

            # takes the top layers out of the encoder before the body lists the layers it runs
            self.task_layers = TaskLayers.from_encoder(encoder, len(tasks.names), tasks.task_layers)
        self.body = encoder_body(encoder, kernels, pooling)
        if self.task_layers is not None:
            self.body.use_task_layers(self.task_layers)
        if packed and not self.body.takes_packed:
            raise ValueError(f"{type(encoder).__name__} runs through its own forward, on padded batches only")
        self.packed = packed
        if kernels and not isinstance(self.body, LayerwiseEncoder):
            from fastcls.patching import patch  # the encoder's own forward then runs fastcls's kernels

            patch(encoder)

    @property
    def num_labels(self) -> int:
        return self.head.num_labels

    @property
    def frozen_embeddings(self) -> bool:
        return self.body.frozen_embeddings

    @property
    def frozen_layers(self) -> int:
        return self.body.frozen_layers

    def _frozen_modules(self) -> list[nn.Module]:
        frozen = list(encoder_layers(self.encoder)[:self.frozen_layers]) if self.frozen_layers else []
        if self.frozen_embeddings:
            frozen.append(encoder_embeddings(self.encoder))
        return frozen

    def freeze(self, embeddings: bool, layers: int) -> None:
        """Stop training the embeddings and/or the bottom `layers` layers: their parameters take no gradient (so
        an optimizer built afterwards holds no state for them), and they run without dropout, so that their
        output for a row never changes."""
        if not embeddings and not layers:
            return
        # all the layers, those moved into task layers included: the body names both flags when it freezes into them
        count = len(encoder_layers(self.encoder)) + (self.task_layers.num_layers if self.task_layers is not None else 0)
        if not 0 <= layers <= count:
            raise ConfigError(f"--freeze-layers {layers}: {type(self.encoder).__name__} has {count} layers")
        self.body.frozen_embeddings, self.body.frozen_layers = embeddings, layers
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def enable_checkpointing(self) -> None:
        self.body.enable_checkpointing()

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mean cross-entropy, or None for a batch without labels; logits [rows, K], or None where the head ran
        its fused linear + cross-entropy for a large label space)."""
        with sdpa_backends() if batch.input_ids.is_cuda else contextlib.nullcontext():
            pooled = self.body.pooled(batch)
        if self.tasks is not None:
            return self.head(pooled, batch.labels, batch.label_counts, batch.row_share)
        return self.head(pooled, batch.labels)


def task_classifier(model: EncoderClassifier, task: int) -> EncoderClassifier:
    """A standalone single-task classifier of a multi-task one's task `task`: the shared encoder with that task's
    own top layers put back, and that task's head (copies: `model` is unchanged)."""
    if model.task_layers is not None:
        from fastcls.models.task_layers import encoder_for_task

        encoder = encoder_for_task(model.encoder, model.task_layers, task)
    else:
        encoder = copy.deepcopy(model.encoder)
    start = sum(model.tasks.num_labels[:task])
    stop = start + model.tasks.num_labels[task]
    single = EncoderClassifier(encoder, model.tasks.num_labels[task], model.head.dropout_p, head_impl=model.head.impl,
                               packed=model.packed, pooling=model.pooling).to(model.head.linear.weight.device)
    with torch.no_grad():
        single.head.linear.weight.copy_(model.head.linear.weight[start:stop])
        single.head.linear.bias.copy_(model.head.linear.bias[start:stop])
    return single.train(model.training)
