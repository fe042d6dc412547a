"""Loading encoders and tokenizers from local folders (nothing is downloaded), and building the classifier."""
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from fastcls.errors import ModelLoadError
from fastcls.models.mean_pooling_hf import wrapped_encoder_config


@contextmanager
def quiet_transformers():
    """from_pretrained warns about the pooler it drops and the head it lacks: both expected here. fastcls checks
    the weights it loads itself. Its progress bar is off too: a log piped to a file stays line-based."""
    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


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


def read_config(path: Path, argument: str = "--model") -> PretrainedConfig:
    """The folder's config.json (a mean-pooled classifier's: the encoder's config inside it), a one-line error naming
    it when transformers cannot read it."""
    try:
        wrapped = wrapped_encoder_config(path)
        return wrapped if wrapped is not None else AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, StrictDataclassError) as err:
        raise ModelLoadError(f"{argument}: {path / 'config.json'}: {_one_line(err)}") from err


def head_dropout(config: PretrainedConfig | None) -> float:
    for name in ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob", "dropout"):
        value = getattr(config, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return 0.1


def encoder_from_config(config: PretrainedConfig) -> nn.Module:
    """A randomly initialised AutoModel encoder without its pooler (fastcls's head reads h_CLS directly)."""
    with quiet_transformers():
        try:
            return AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:  # encoders without a pooler (DistilBERT, ModernBERT) take no such argument
            return AutoModel.from_config(config)


def load_encoder(path: str | Path) -> nn.Module:
    """Any AutoModel encoder from a local folder (a fastcls run folder too: its weights are a sequence
    classifier's, whose encoder part loads), without the pooler.

    Weights load in fp32 whatever the checkpoint holds: they are the master weights that autocast and the
    optimizer work from. A weight the encoder needs but the folder lacks is an error, never a random init, and so
    is one inside the encoder that it has no place for (`stray_encoder_keys`)."""
    path = check_model_dir(path)
    with quiet_transformers():
        try:
            # a mean-pooled classifier's folder (fastcls export) names its encoder's config inside its own
            config = wrapped_encoder_config(path)
            options = dict(dtype=torch.float32, local_files_only=True, output_loading_info=True,
                           **({} if config is None else {"config": config}))
            try:
                encoder, info = AutoModel.from_pretrained(path, add_pooling_layer=False, **options)
            except TypeError:
                encoder, info = AutoModel.from_pretrained(path, **options)
        except (OSError, ValueError, SafetensorError, StrictDataclassError) as err:
            raise ModelLoadError(f"--model: cannot load an encoder from {path}: {_one_line(err)}") from err
    faults = {"missing": sorted(info.get("missing_keys", ())), "wrong shape": list(info.get("mismatched_keys", ())),
              "unexpected": stray_encoder_keys(encoder, info.get("unexpected_keys", ()))}
    if any(faults.values()):
        raise ModelLoadError(f"--model: {path}: the weights do not fit its config.json: " + ", ".join(
            f"{what} {keys[:5]}{' ...' if len(keys) > 5 else ''}" for what, keys in faults.items() if keys))
    return own_aligned_storage(encoder)


# Weights a folder may hold beside its encoder's: the pooler, which fastcls's head replaces (a run folder keeps
# BERT's transformers head middle layer there, `bert.pooler.dense`), and any task head outside the encoder's
# namespace (a run folder's `classifier.*` / `pre_classifier.*`, a pretraining checkpoint's `cls.*` or `lm_head.*`)
EXPECTED_EXTRA = "pooler"


def stray_encoder_keys(encoder: nn.Module, unexpected) -> list[str]:
    """The unexpected weights that lie inside the encoder's namespace (under its base-model prefix, or under one
    of its own submodules' names), the pooler excepted: weights of a differently built encoder, never ignored."""
    prefix = getattr(encoder, "base_model_prefix", "") + "."
    own = {name for name, _ in encoder.named_children()}
    stray = []
    for key in unexpected:
        inner = key[len(prefix):] if key.startswith(prefix) else key
        first = inner.split(".", 1)[0]
        if first != EXPECTED_EXTRA and (key.startswith(prefix) or first in own):
            stray.append(key)
    return sorted(stray)


def own_aligned_storage(module: nn.Module) -> nn.Module:
    """Give every parameter its own freshly allocated storage. Weights loaded from safetensors can be views into
    one file-sized buffer at offsets that are not 16-byte aligned; the fused AdamW would then have to stage such
    a parameter through a copy every step (MiniLM on the CPU: 20 ms of a 50 ms optimizer step)."""
    for param in module.parameters():
        if param.data_ptr() % 64:
            param.data = param.data.clone()
    return module


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def load_tokenizer(path: str | Path, argument: str = "--model"):
    path = check_model_dir(path, argument)
    try:
        # never asks to run a folder's own code (a mean-pooled run's modeling_fastcls.py): its encoder's config
        # names the tokenizer where tokenizer_config.json does not
        wrapped = wrapped_encoder_config(path)
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, local_files_only=True, trust_remote_code=False,
                                                  **({} if wrapped is None else {"config": wrapped}))
    except Exception as err:  # noqa: BLE001 - a damaged tokenizer file raises ValueError, KeyError or tokenizers'
        # bare Exception, depending on where the parse stops
        raise ModelLoadError(f"{argument}: cannot load a tokenizer from {path} (tokenizer.json, "
                             f"tokenizer_config.json): {type(err).__name__}: {_one_line(err)}") from err
    if not tokenizer.is_fast:
        raise ModelLoadError(f"{argument}: {path} has no fast tokenizer (tokenizer.json); fastcls needs one")
    return tokenizer
