"""Export a fastcls model folder so that `AutoModelForSequenceClassification.from_pretrained` loads it.

Hugging Face heads put a small layer between h_CLS and the classifier (BERT's tanh pooler, RoBERTa's
dense+tanh, ELECTRA's dense+GELU, DistilBERT's dense+ReLU); fastcls's head has none. The export sets
that layer to act as the identity on h_CLS, so the exported model gives fastcls's predictions:
- tanh: dense = s*I with s small, where tanh(s*h) = s*h to a relative (s*h)^2/3, and the classifier
  takes W_C/s;
- GELU/ReLU: dense = I with bias c, where act(h + c) = h + c exactly for h + c well above zero, and the
  classifier's bias takes -W_C c.
"""
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from fastcls.model import ModelLoadError, _quiet_transformers, load_trained

TANH_SCALE = 1e-4
# GELU(x) = x exactly in fp32 once x > ~8; hidden states sit far above -(SHIFT - 8)
ACTIVATION_SHIFT = 64.0

# model_type -> (module path of the layer between h_CLS and the classifier, its activation, classifier path)
HEADS = {
    "bert": ("bert.pooler.dense", "tanh", "classifier"),
    "roberta": ("classifier.dense", "tanh", "classifier.out_proj"),
    "xlm-roberta": ("classifier.dense", "tanh", "classifier.out_proj"),
    "camembert": ("classifier.dense", "tanh", "classifier.out_proj"),
    "mpnet": ("classifier.dense", "tanh", "classifier.out_proj"),
    "electra": ("classifier.dense", "gelu", "classifier.out_proj"),
    "distilbert": ("pre_classifier", "relu", "classifier"),
}


@torch.no_grad()
def export_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    model, tokenizer, labels, _ = load_trained(model_dir)
    config = model.encoder.config
    if config.model_type not in HEADS:
        raise ModelLoadError(
            f"export: model type {config.model_type!r} is not supported (supported: {', '.join(sorted(HEADS))}); "
            f"the fastcls folder {model_dir} still loads with `fastcls eval/predict`"
        )
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels.names))
    config.label2id = {name: i for i, name in enumerate(labels.names)}
    with _quiet_transformers():
        hf = AutoModelForSequenceClassification.from_config(config)
    base = getattr(hf, hf.base_model_prefix)
    missing, unexpected = base.load_state_dict(model.encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise ModelLoadError(f"export: encoder weights do not fit {type(hf).__name__}: {missing[:5]} {unexpected[:5]}")

    middle_path, activation, classifier_path = HEADS[config.model_type]
    middle: nn.Linear = hf.get_submodule(middle_path)
    classifier: nn.Linear = hf.get_submodule(classifier_path)
    w, b = model.classifier.weight.float(), model.classifier.bias.float()
    eye = torch.eye(config.hidden_size)
    if activation == "tanh":
        middle.weight.copy_(TANH_SCALE * eye)
        middle.bias.zero_()
        classifier.weight.copy_(w / TANH_SCALE)
        classifier.bias.copy_(b)
    else:
        shift = torch.full((config.hidden_size,), ACTIVATION_SHIFT)
        middle.weight.copy_(eye)
        middle.bias.copy_(shift)
        classifier.weight.copy_(w)
        classifier.bias.copy_(b - w @ shift)

    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
