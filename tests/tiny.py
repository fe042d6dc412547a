"""Tiny random encoders and small data for the tests."""
import csv
import random

import numpy as np
import torch
from transformers import AutoConfig, AutoModel

from fastcls.config import BUNDLED_TRAIN, bundled_model_path
from fastcls.data import Encoded
from fastcls.models.loading import load_tokenizer

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128)


def make_tiny_encoder(folder, model_type="bert", **overrides):
    """A random encoder of `model_type` saved with the bundled model's tokenizer."""
    tokenizer = load_tokenizer(bundled_model_path())
    if model_type == "distilbert":
        config = AutoConfig.for_model("distilbert", vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2,
                                      hidden_dim=64, max_position_embeddings=128, pad_token_id=0)
    else:
        config = AutoConfig.for_model(model_type, vocab_size=tokenizer.vocab_size, pad_token_id=0,
                                      **{**TINY, **overrides})
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_encoder(family, dropout=0.1, layers=3):
    """A random in-memory encoder of `family` with a 99-token vocabulary (pad id 1)."""
    torch.manual_seed(0)
    if family == "distilbert":
        config = AutoConfig.for_model("distilbert", vocab_size=99, dim=32, n_layers=layers, n_heads=4, hidden_dim=37,
                                      max_position_embeddings=64, pad_token_id=1, dropout=dropout,
                                      attention_dropout=dropout)
    else:
        config = AutoConfig.for_model(family, vocab_size=99, hidden_size=32, num_hidden_layers=layers,
                                      num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                      pad_token_id=1, hidden_dropout_prob=dropout,
                                      attention_probs_dropout_prob=dropout)
    return AutoModel.from_config(config)


def encoded_rows(lengths, seed=0, token_types=True, num_labels=3):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    ids = rng.integers(2, 99, size=int(lengths.sum())).astype(np.int32)
    types = rng.integers(0, 2, size=len(ids)).astype(np.int32) if token_types else None
    labels = rng.integers(0, num_labels, size=len(lengths))
    return Encoded(input_ids=ids, lengths=lengths, token_type_ids=types, labels=labels, num_truncated=0,
                   max_length=64)


def sst2_rows(n, seed=0):
    with open(BUNDLED_TRAIN) as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def write_tsv(path, rows, header=("label", "sentence")):
    with open(path, "w") as f:
        f.write("\t".join(header) + "\n")
        f.writelines("\t".join(row) + "\n" for row in rows)
    return path


def tiny_run_inputs(folder, rows, seed):
    """`folder` with a tiny BERT (folder/encoder) and `rows` random SST-2 training rows (folder/train.tsv)."""
    make_tiny_encoder(folder / "encoder")
    write_tsv(folder / "train.tsv", sst2_rows(rows, seed=seed))
    return folder
