"""The one table of encoder families: where each keeps its layers and embeddings, how its layers are built, which
of its Hugging Face blocks fastcls's kernels replace, and the head its AutoModelForSequenceClassification has.

Everything that needs to know a family reads it from here: the layer-by-layer encoder (`fastcls.models.encoder`),
freezing, `fastcls.patch`, and the run folder's transformers layout (`fastcls.models.hf_layout`). An encoder
whose `config.model_type` is not in the table still trains, padded, through its own forward.
"""
from dataclasses import dataclass

from torch import nn

@dataclass(frozen=True)
class HFHead:
    """The head of a family's AutoModelForSequenceClassification: h_CLS -> middle (dense + activation) ->
    classifier. Paths are module paths in that model."""

    middle: str
    activation: str  # tanh | gelu | relu
    classifier: str


@dataclass(frozen=True)
class Family:
    name: str
    layers: str  # path of the layer ModuleList inside the base encoder
    embeddings: str = "embeddings"
    # how a layer is built, for the layer-by-layer encoder: "bert" (BertLayer and its copies), "distilbert"
    # (TransformerBlock), or None: the family runs through its own forward
    layer_kind: str | None = None
    position_offset: bool = False  # positions start at padding_idx + 1 (RoBERTa and its descendants)
    # the blocks `fastcls.patch` fuses: LayerNorm(dropout(dense(h)) + residual) blocks, and embeddings ending in
    # dropout(LayerNorm(.)), by class name
    output_blocks: tuple[str, ...] = ()
    embedding_blocks: tuple[str, ...] = ()
    # its attention runs through transformers' attention-function interface, which `fastcls.patch` can point at
    # fastcls's attention (a family computing attention itself reads the config's choice only to build its mask)
    attention_interface: bool = False
    hf_head: HFHead | None = None


def _bert_like(name: str, prefix: str, **extra) -> Family:
    return Family(name, "encoder.layer", layer_kind="bert",
                  output_blocks=(f"{prefix}SelfOutput", f"{prefix}Output"),
                  embedding_blocks=(f"{prefix}Embeddings",), attention_interface=True, **extra)


_TANH = HFHead("classifier.dense", "tanh", "classifier.out_proj")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    # MiniLM checkpoints (all-MiniLM-L6-v2, the bundled model) are BERT models
    _bert_like("bert", "Bert", hf_head=HFHead("bert.pooler.dense", "tanh", "classifier")),
    _bert_like("roberta", "Roberta", position_offset=True, hf_head=_TANH),
    _bert_like("xlm-roberta", "XLMRoberta", position_offset=True, hf_head=_TANH),
    _bert_like("camembert", "Camembert", position_offset=True, hf_head=_TANH),
    _bert_like("electra", "Electra", hf_head=HFHead("classifier.dense", "gelu", "classifier.out_proj")),
    Family("distilbert", "transformer.layer", layer_kind="distilbert", embedding_blocks=("Embeddings",),
           attention_interface=True, hf_head=HFHead("pre_classifier", "relu", "classifier")),
    # MPNet's attention adds a relative position bias: it runs through its own forward, its output blocks fused
    Family("mpnet", "encoder.layer", output_blocks=("MPNetOutput",), embedding_blocks=("MPNetEmbeddings",),
           hf_head=_TANH),
    # ModernBERT: rotary attention, bias-free norms and a head with its own LayerNorm, which no identity mimics
    Family("modernbert", "layers"),
)}


def family_of(encoder: nn.Module) -> Family | None:
    config = getattr(encoder, "config", None)
    return FAMILIES.get(getattr(config, "model_type", None))


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's layers, bottom first: the table's path, or for other encoders the ModuleList as long as the
    config's layer count."""
    family = family_of(encoder)
    if family is not None:
        layers = _submodule(encoder, family.layers)
        if isinstance(layers, nn.ModuleList):
            return layers
    count = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the layers of {type(encoder).__name__}")


def encoder_embeddings(encoder: nn.Module) -> nn.Module:
    """The embeddings module (word, position, token-type embeddings and their norm), or the input embeddings."""
    family = family_of(encoder)
    embeddings = _submodule(encoder, family.embeddings) if family is not None else None
    return embeddings if embeddings is not None else encoder.get_input_embeddings()
