"""A mean-pooled classifier in transformers' layout, through transformers' custom-code mechanism.

A family's AutoModelForSequenceClassification reads h_CLS: a mean-pooled model loaded there would load without a
word and predict wrongly. So a mean-pooled run folder or export holds instead `modeling_fastcls.py` (generated
here) and a config.json of its own `model_type` ("fastcls_mean_<family>") whose `auto_map` points AutoConfig and
AutoModelForSequenceClassification at that file, with the encoder's own config inside (`encoder_config`):

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)   # fastcls's predictions
    AutoModelForSequenceClassification.from_pretrained(folder)                           # refused by transformers

The model is the base encoder (AutoModel from the inner config, without its pooler) under the family's
`base_model_prefix`, the mean of the last hidden states over the attention mask, and `classifier` (`MEAN_HEAD`),
fastcls's linear layer as it is (no identity layer to fake). Any encoder type that AutoModel builds is supported.
"""
import json
from pathlib import Path

from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from fastcls.data import LabelMap
from fastcls.models.hf_layout import MEAN_HEAD, encoder_prefix

MODELING_FILE = "modeling_fastcls.py"
MODEL_TYPE_PREFIX = "fastcls_mean_"
CONFIG_CLASS = "FastclsMeanPoolingConfig"
MODEL_CLASS = "FastclsMeanPoolingForSequenceClassification"

_MODELING_TEMPLATE = '''"""A classifier trained by fastcls with mean pooling: the encoder, the mean of its last hidden
states over each row's real tokens (padding excluded), and a linear layer. Written by fastcls; load it with
trust_remote_code=True."""
import inspect

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel, PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput


class {config_class}(PretrainedConfig):
    model_type = "{model_type}"

    def __init__(self, encoder_config=None, **kwargs):
        self.encoder_config = encoder_config or {{}}  # the base encoder's own config.json
        super().__init__(**kwargs)


class {model_class}(PreTrainedModel):
    config_class = {config_class}
    base_model_prefix = "{prefix}"

    def __init__(self, config):
        super().__init__(config)
        encoder = AutoModel.from_config(AutoConfig.for_model(**config.encoder_config))
        if isinstance(getattr(encoder, "pooler", None), nn.Module):
            encoder.pooler = None  # the mean replaces it
        self.{prefix} = encoder
        self.takes_token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters
        self.{head} = nn.Linear(encoder.config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {{"input_ids": input_ids, "attention_mask": attention_mask}}
        if token_type_ids is not None and self.takes_token_types:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.{prefix}(**inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(torch.promote_types(hidden.dtype, torch.float32))
        pooled = (hidden.to(mask.dtype) * mask).sum(1) / mask.sum(1)
        logits = self.{head}(pooled.to(self.{head}.weight.dtype))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
'''


def supported(encoder: nn.Module) -> bool:
    """Whether transformers' AutoModel builds this encoder from its config (what the generated model does)."""
    return getattr(getattr(encoder, "config", None), "model_type", None) in MODEL_MAPPING_NAMES


def _model_type(encoder: nn.Module) -> str:
    return MODEL_TYPE_PREFIX + encoder.config.model_type.replace("-", "_")


def modeling_code(encoder: nn.Module) -> str:
    """modeling_fastcls.py for this encoder's family."""
    return _MODELING_TEMPLATE.format(config_class=CONFIG_CLASS, model_class=MODEL_CLASS,
                                     model_type=_model_type(encoder), prefix=encoder_prefix(encoder), head=MEAN_HEAD)


def mean_pooling_config(encoder: nn.Module, labels: LabelMap) -> dict:
    """config.json of the mean-pooled classifier: the encoder's config inside, the labels by name."""
    inner = encoder.config.to_dict()  # a copy
    inner.pop("architectures", None)
    return {
        "model_type": _model_type(encoder),
        "architectures": [MODEL_CLASS],
        "auto_map": {"AutoConfig": f"{Path(MODELING_FILE).stem}.{CONFIG_CLASS}",
                     "AutoModelForSequenceClassification": f"{Path(MODELING_FILE).stem}.{MODEL_CLASS}"},
        "encoder_config": inner,
        "num_labels": len(labels),
        "id2label": {str(i): name for i, name in enumerate(labels.names)},
        "label2id": {name: i for i, name in enumerate(labels.names)},
        "problem_type": "single_label_classification",
        "pooling": "mean",
    }


def wrapped_encoder_config(folder: Path) -> PretrainedConfig | None:
    """The encoder's config inside a mean-pooled folder's config.json; None for any other folder. Raises
    ValueError for a wrapped config of an unknown encoder type."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # transformers' own reading names the fault
    if not isinstance(config, dict) or not str(config.get("model_type", "")).startswith(MODEL_TYPE_PREFIX):
        return None
    inner = config.get("encoder_config")
    model_type = inner.get("model_type") if isinstance(inner, dict) else None
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"its encoder_config names no model type transformers knows ({model_type!r})")
    return CONFIG_MAPPING[model_type].from_dict(inner)
