"""fastcls's classifier in the layout of a transformers AutoModelForSequenceClassification checkpoint, so that
a run folder loads in `from_pretrained` and `pipeline("text-classification")` with fastcls's predictions.

Hugging Face heads put a small layer between h_CLS and the classifier (BERT's tanh pooler, RoBERTa's
dense + tanh, ELECTRA's dense + GELU, DistilBERT's dense + ReLU; `families.HFHead`); fastcls's head has none.
That layer is set to act as the identity on h_CLS:
- tanh: dense = s I with s = 2^-13, where tanh(s h) = s h to a relative (s h)^2 / 3, and the classifier
  takes W_C / s (exact: s is a power of two);
- GELU / ReLU: dense = I with bias c, where act(h + c) = h + c exactly for h + c well above zero (GELU(x) = x
  in fp32 once x > ~8; hidden states sit far above -(c - 8)), and the classifier's bias takes b - W_C c.

A mean-pooled classifier has no such head to borrow: it is written for the model that
`fastcls.models.mean_pooling_hf` generates, its linear layer as it is under `MEAN_HEAD`.

Encoder weights sit under the model's `base_model_prefix`. fastcls reads its own head back from the exact copy
the checkpointer keeps beside them (the GELU/ReLU mapping does not round-trip bit for bit).
"""
import copy

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from fastcls.data import LabelMap
from fastcls.models.families import family_of

TANH_SCALE = 2.0**-13
ACTIVATION_SHIFT = 64.0
MEAN_HEAD = "classifier"  # the mean-pooled model's linear layer


def encoder_prefix(encoder: nn.Module) -> str:
    return getattr(encoder, "base_model_prefix", "") or "encoder"


def hf_state_dict(classifier) -> dict[str, torch.Tensor]:
    """The classifier's weights under the names its family's AutoModelForSequenceClassification uses (mean
    pooling: the generated model's); the head appears only for families with a known head (others keep only the
    encoder there)."""
    encoder = classifier.encoder
    prefix = encoder_prefix(encoder)
    state = {f"{prefix}.{name}": tensor for name, tensor in encoder.state_dict().items()}
    if classifier.pooling == "mean":
        linear = classifier.head.linear
        return {**state, f"{MEAN_HEAD}.weight": linear.weight, f"{MEAN_HEAD}.bias": linear.bias}
    family = family_of(encoder)
    if family is None or family.hf_head is None:
        return state
    head = family.hf_head
    w = classifier.head.linear.weight.detach().float().cpu()
    b = classifier.head.linear.bias.detach().float().cpu()
    eye = torch.eye(w.shape[1])
    if head.activation == "tanh":
        middle_w, middle_b, out_w, out_b = TANH_SCALE * eye, torch.zeros(w.shape[1]), w / TANH_SCALE, b
    else:
        shift = torch.full((w.shape[1],), ACTIVATION_SHIFT)
        middle_w, middle_b, out_w, out_b = eye, shift, w, (b.double() - w.double() @ shift.double()).float()
    state.update({f"{head.middle}.weight": middle_w, f"{head.middle}.bias": middle_b,
                  f"{head.classifier}.weight": out_w, f"{head.classifier}.bias": out_b})
    return state


def encoder_state_from_hf(encoder: nn.Module, state: dict[str, torch.Tensor],
                          pooling: str = "cls") -> tuple[dict, list[str]]:
    """(the encoder's weights out of an `hf_state_dict`, the keys that are neither encoder nor known head)."""
    prefix = encoder_prefix(encoder) + "."
    family = family_of(encoder)
    head_keys = set()
    if pooling == "mean":
        head_keys = {f"{MEAN_HEAD}.weight", f"{MEAN_HEAD}.bias"}
    elif family is not None and family.hf_head is not None:
        head_keys = {f"{path}.{kind}" for path in (family.hf_head.middle, family.hf_head.classifier)
                     for kind in ("weight", "bias")}
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k not in head_keys}
    stray = sorted(k for k in state if not k.startswith(prefix) and k not in head_keys)
    return encoder_state, stray


def hf_config(encoder: nn.Module, labels: LabelMap):
    """The encoder's config as its AutoModelForSequenceClassification's, with the labels by name."""
    config = copy.deepcopy(encoder.config)
    architecture = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if architecture is not None:
        config.architectures = [architecture]
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels.names))
    config.label2id = {name: i for i, name in enumerate(labels.names)}
    config.problem_type = "single_label_classification"
    return config
