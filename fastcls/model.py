"""The classifier: a pretrained Hugging Face encoder and fastcls's head on the [CLS] vector.

    logits = dropout(h_CLS) @ W_C + b        (W_C: d x K)

Training computes the loss with it through `EncoderClassifier.loss_and_logits`: fastcls's fused head
(`fastcls.ops.classification_head`) or, for comparison, PyTorch's modules and reference cross-entropy.

A trained model folder holds `model.safetensors` (encoder and head), the encoder's `config.json`,
`fastcls.json` (head and label facts), `labels.json` and the tokenizer files.
"""
import functools
import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from fastcls.data import LabelMap, PackedBatch
from fastcls.encoder_stack import EncoderStack, recompute_in_the_same_context
from fastcls.ops import classification_head, cross_entropy_reference

WEIGHTS_FILE = "model.safetensors"
FASTCLS_FILE = "fastcls.json"
LABELS_FILE = "labels.json"


class ModelLoadError(ValueError):
    pass


@contextmanager
def _quiet_transformers():
    # from_pretrained warns about the pooler it drops and the head it lacks: both are expected here
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def head_dropout(config: PretrainedConfig) -> float:
    for name in ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob", "dropout"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return 0.1


class EncoderClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(encoder.config, "initializer_range", 0.02))
        nn.init.zeros_(self.classifier.bias)
        # BERT's tokenizer emits token types that a DistilBERT or RoBERTa encoder built on it may not take
        self.takes_token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters
        self.frozen_embeddings, self.frozen_layers, self.checkpointing = False, 0, False
        self.stack = EncoderStack(encoder) if EncoderStack.supports(encoder) else None

    @property
    def num_labels(self) -> int:
        return self.classifier.out_features

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's layers, bottom first: the ModuleList as long as the config's layer count."""
        count = self.encoder.config.num_hidden_layers
        for module in self.encoder.modules():
            if isinstance(module, nn.ModuleList) and len(module) == count:
                return module
        raise ValueError(f"cannot find the {count} layers of {type(self.encoder).__name__}")

    def _frozen_modules(self) -> list[nn.Module]:
        frozen = list(self.layers[:self.frozen_layers]) if self.frozen_layers else []
        if self.frozen_embeddings:
            frozen.append(self.encoder.get_input_embeddings() if self.stack is None else self.stack.embeddings)
        return frozen

    def freeze(self, embeddings: bool, layers: int) -> None:
        """Stop training the embeddings and/or the bottom `layers` layers: their parameters take no gradient (so
        the optimizer, built afterwards, holds no state for them), and they run without dropout, so that their
        output for a row never changes."""
        if not embeddings and not layers:
            return
        count = len(self.layers)
        if not 0 <= layers <= count:
            raise ValueError(f"--freeze-layers {layers}: {type(self.encoder).__name__} has {count} layers")
        self.frozen_embeddings, self.frozen_layers = embeddings, layers
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train(self.training)

    def enable_checkpointing(self) -> None:
        """Recompute each trainable layer's activations in the backward (non-reentrant: gradients reach the
        trainable layers even when their input, coming from a frozen prefix, needs none)."""
        self.checkpointing = True
        if self.stack is not None:
            return
        for layer in self.layers[self.frozen_layers:]:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False,
                                              context_fn=recompute_in_the_same_context)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def hidden_states(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The encoder's last hidden states [B, L, d]."""
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None and self.takes_token_types else {}
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    def cls_hidden(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self.hidden_states(input_ids, attention_mask, token_type_ids)[:, 0]

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self.classifier(self.dropout(self.cls_hidden(input_ids, attention_mask, token_type_ids)))

    def loss_and_logits(self, input_ids, attention_mask, labels, token_type_ids=None, *, head_impl: str = "fused"):
        """(mean cross-entropy against labels, logits). head_impl "fused" runs the head and the loss through
        fastcls.ops.classification_head (labels are trusted: no target check, which would cost a host sync on
        CUDA); "reference" runs this module's dropout and linear layer and PyTorch's cross-entropy."""
        if head_impl == "reference":
            logits = self.forward(input_ids, attention_mask, token_type_ids)
            return cross_entropy_reference(logits, labels), logits
        if head_impl != "fused":
            raise ValueError(f"head_impl must be fused or reference, got {head_impl!r}")
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return classification_head(hidden, self.classifier.weight, self.classifier.bias, labels,
                                   dropout_p=self.dropout.p, training=self.dropout.training, validate=False)

    def packed_loss_and_logits(self, batch: PackedBatch, *, fused: bool = True, head_impl: str = "fused",
                               prefix: torch.Tensor | None = None):
        """(loss, logits, the frozen prefix's output or None) for an unpadded batch, through `self.stack`.
        `fused`: the encoder's dropout and LayerNorms run fastcls's kernels (else PyTorch's ops); `head_impl` as
        in `loss_and_logits`. `prefix`: the prefix output returned before for the same rows, to skip the prefix."""
        cls, prefix_out = self.stack.cls_hidden(
            batch, training=self.training, frozen_embeddings=self.frozen_embeddings, frozen_layers=self.frozen_layers,
            checkpointing=self.checkpointing, fused=fused, prefix=prefix)
        if head_impl == "fused":
            loss, logits = classification_head(cls, self.classifier.weight, self.classifier.bias, batch.labels,
                                               dropout_p=self.dropout.p, training=self.training, validate=False)
        else:
            logits = self.classifier(self.dropout(cls))
            loss = cross_entropy_reference(logits, batch.labels)
        return loss, logits, prefix_out


def check_model_dir(path: str | Path, argument: str = "--model") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{argument}: model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{argument}: {path} has no config.json; pass a Hugging Face model folder "
            "(config.json, weights and tokenizer files) or a folder written by `fastcls train`"
        )
    return path


def load_encoder(path: str | Path) -> nn.Module:
    """Any AutoModel encoder, without the pooler (fastcls's head reads h_CLS directly).

    Weights load in fp32 whatever the checkpoint holds: they are the master weights that autocast and the
    optimizer work from."""
    path = check_model_dir(path)
    with _quiet_transformers():
        try:
            encoder = AutoModel.from_pretrained(path, add_pooling_layer=False, dtype=torch.float32)
        except TypeError:  # encoders without a pooler (DistilBERT, ModernBERT) take no such argument
            encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"--model: cannot load an encoder from {path}: {err}") from err
    return own_aligned_storage(encoder)


def own_aligned_storage(module: nn.Module) -> nn.Module:
    """Give every parameter its own freshly allocated storage. Weights loaded from safetensors can be views into
    one file-sized buffer at offsets that are not 16-byte aligned; the fused AdamW would then have to stage such
    a parameter through a copy every step (MiniLM on the CPU: 20 ms of a 50 ms optimizer step)."""
    for param in module.parameters():
        if param.data_ptr() % 64:
            param.data = param.data.clone()
    return module


def load_tokenizer(path: str | Path):
    path = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"--model: cannot load a tokenizer from {path}: {err}") from err
    if not tokenizer.is_fast:
        raise ModelLoadError(f"--model: {path} has no fast tokenizer (tokenizer.json); fastcls needs one")
    return tokenizer


def build_classifier(model_path: str | Path, num_labels: int, dropout: float | None = None) -> EncoderClassifier:
    encoder = load_encoder(model_path)
    return EncoderClassifier(encoder, num_labels, head_dropout(encoder.config) if dropout is None else dropout)


def save_static_files(out_dir: Path, model: EncoderClassifier, tokenizer, labels: LabelMap, extra: dict) -> None:
    """What does not change during training: written once, before the first checkpoint."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.encoder.config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    labels.save(out_dir / LABELS_FILE)
    meta = {"num_labels": model.num_labels, "head_dropout": model.dropout.p, "format": 1, **extra}
    (out_dir / FASTCLS_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_trained(model_dir: str | Path, device: str | torch.device = "cpu"):
    """A folder written by `fastcls train` -> (model in eval mode, tokenizer, labels, fastcls.json)."""
    model_dir = check_model_dir(model_dir)
    for name in (WEIGHTS_FILE, FASTCLS_FILE, LABELS_FILE):
        if not (model_dir / name).is_file():
            raise ModelLoadError(f"--model: {model_dir} lacks {name}; is it a folder written by `fastcls train`?")
    meta = json.loads((model_dir / FASTCLS_FILE).read_text())
    labels = LabelMap.load(model_dir / LABELS_FILE)
    if len(labels) != meta["num_labels"]:
        raise ModelLoadError(f"{model_dir}: labels.json has {len(labels)} labels, fastcls.json {meta['num_labels']}")
    config = AutoConfig.from_pretrained(model_dir)
    with _quiet_transformers():
        try:
            encoder = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            encoder = AutoModel.from_config(config)
    model = EncoderClassifier(encoder, meta["num_labels"], meta["head_dropout"])
    state = load_file(model_dir / WEIGHTS_FILE)
    mismatch = f"{model_dir / WEIGHTS_FILE} does not match the model in {model_dir / 'config.json'}"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ
        raise ModelLoadError(f"{mismatch}: {err}") from err
    if missing or unexpected:
        raise ModelLoadError(f"{mismatch}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.to(device).eval(), load_tokenizer(model_dir), labels, meta

