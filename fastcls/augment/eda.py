"""The four EDA operations (Wei & Zou 2019) and `augment_rows`, which makes `num_aug` copies of every row.

As in the paper, each row's copies are drawn from int(num_aug / k) + 1 candidates per enabled operation (k of them;
k = 4 is the paper's), shuffled, the first num_aug kept; n = max(1, int(alpha * words)) edits per copy:

- sr: n distinct non-stop words that have synonyms, each replaced (every occurrence) by a random synonym;
- ri: n times, a random synonym of a random non-stop word of the row inserted before a random word, or after the
  last (taking its trailing punctuation with it);
- rs: n times, two random words swap places;
- rd: each word deleted with probability p_rd; a row of one word stays as it is, and a row is never emptied (one
  random word stays). A deleted word's punctuation stays: leading punctuation joins the next token, trailing
  punctuation the previous one (at the start of the text it stays on its own).

Unlike the paper's code the text is not lower-cased or stripped: see `text.py` for how case and punctuation are
kept. A row of several texts (text, pair) gets the same operation on each text, each edited independently.

Reproducible: each row's random stream is seeded from (seed, epoch, row index) alone, so the same seed gives the
same copies in any process, whatever PYTHONHASHSEED, and whichever rows come before it.
"""
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fastcls.augment.config import OPS, EdaConfig
from fastcls.augment.stopwords import STOP_WORDS
from fastcls.augment.synonyms import SynonymTable
from fastcls.augment.text import (
    CORE,
    IS_WORD,
    START_CAP,
    TRAIL,
    WAS_START,
    looks_proper,
    render,
    shaped,
    tokenize,
)


@dataclass
class Augmented:
    texts: list[tuple[str, ...]]  # the copies only: num_aug per input row, in input row order
    source: np.ndarray  # int64, the input row each copy came from
    ops: list[str]  # the operation that made each copy ("sr", "ri", "rs", "rd")


@dataclass
class _Text:
    """One text prepared once for all its copies."""

    tokens: list[list]
    cased: bool
    words: list[int]  # token indices of the words
    content: list[tuple[int, str]]  # (token index, lower-case word) of the non-stop words that have synonyms


def _prepare(text: str, synonyms: SynonymTable) -> _Text:
    tokens, cased = tokenize(text)
    words = [i for i, token in enumerate(tokens) if token[IS_WORD]]
    content = []
    for i in words:
        word = tokens[i][CORE].lower()
        if word not in STOP_WORDS and synonyms.lookup(word):
            content.append((i, word))
    return _Text(tokens, cased, words, content)


def _edits(alpha: float, text: _Text) -> int:
    return max(1, int(alpha * len(text.words)))


def synonym_replacement(text: _Text, rng: random.Random, cfg: EdaConfig, synonyms: SynonymTable) -> str:
    candidates = list(dict.fromkeys(word for _, word in text.content))
    rng.shuffle(candidates)
    chosen = {word: rng.choice(synonyms.lookup(word)) for word in candidates[:_edits(cfg.alpha_sr, text)]}
    tokens = text.tokens[:]
    for i, word in text.content:
        if word in chosen:
            token = tokens[i] = tokens[i][:]
            token[CORE] = shaped(chosen[word], token[CORE])
    return render(tokens, text.cased)


def random_insertion(text: _Text, rng: random.Random, cfg: EdaConfig, synonyms: SynonymTable) -> str:
    tokens = text.tokens[:]
    for _ in range(_edits(cfg.alpha_ri, text) if text.content else 0):
        i, word = rng.choice(text.content)
        source = text.tokens[i]
        new = rng.choice(synonyms.lookup(word))
        # the source's case shape where it is the word's own (ALLCAPS, a proper noun), not its place's
        if looks_proper(source[CORE]) or (source[CORE][0].isupper() and not source[WAS_START]):
            new = shaped(new, source[CORE])
        inserted = ["", new, "", True, False, False]
        words = [k for k, token in enumerate(tokens) if token[IS_WORD]]
        gap = rng.randrange(len(words) + 1)
        if gap < len(words):
            tokens.insert(words[gap], inserted)
        else:  # after the last word, before its trailing punctuation
            last = tokens[words[-1]] = tokens[words[-1]][:]
            inserted[TRAIL], last[TRAIL] = last[TRAIL], ""
            tokens.insert(words[-1] + 1, inserted)
    return render(tokens, text.cased)


def random_swap(text: _Text, rng: random.Random, cfg: EdaConfig, synonyms: SynonymTable) -> str:
    tokens = text.tokens[:]
    for _ in range(_edits(cfg.alpha_rs, text) if len(text.words) > 1 else 0):
        a, b = rng.choice(text.words), rng.choice(text.words)
        for _ in range(3):  # as the paper: a few tries for a second, different word
            if a != b:
                break
            b = rng.choice(text.words)
        if a == b:
            continue
        # the word (its core and where its capital came from) moves; the punctuation stays with the place
        first, second = tokens[a][:], tokens[b][:]
        for field in (CORE, WAS_START, START_CAP):
            first[field], second[field] = second[field], first[field]
        tokens[a], tokens[b] = first, second
    return render(tokens, text.cased)


def random_deletion(text: _Text, rng: random.Random, cfg: EdaConfig, synonyms: SynonymTable) -> str:
    if len(text.words) < 2:
        return render(text.tokens, text.cased)
    deleted = [False] * len(text.tokens)
    for i in text.words:
        deleted[i] = rng.random() < cfg.p_rd
    if all(deleted[i] for i in text.words):
        deleted[rng.choice(text.words)] = False
    kept: list[list] = []
    waiting = ""  # leading punctuation of deleted words, for the next kept token
    for token, gone in zip(text.tokens, deleted, strict=True):
        if not gone:
            if waiting:
                token = token[:]
                token[0], waiting = waiting + token[0], ""
            kept.append(token)
            continue
        if not kept:  # nothing before it to take its punctuation: that stays in place
            if token[0] + token[TRAIL]:
                kept.append([token[0] + token[TRAIL], "", "", False, False, False])
            continue
        waiting += token[0]
        if token[TRAIL]:
            kept[-1] = kept[-1][:]
            kept[-1][TRAIL] += token[TRAIL]
    if waiting:
        kept[-1] = kept[-1][:]
        kept[-1][TRAIL] += waiting
    return render(kept, text.cased)


OPERATIONS = {"sr": synonym_replacement, "ri": random_insertion, "rs": random_swap, "rd": random_deletion}


def row_random(seed: int, epoch: int, row: int) -> random.Random:
    """The random stream of one row: from (seed, epoch, row) alone. Mersenne Twister seeded with one integer
    holding the three (its init_by_array mixes every 32-bit piece of the key into the whole state)."""
    return random.Random((seed % 2**64) << 128 | (epoch % 2**64) << 64 | row)


def augment_rows(texts: Sequence[tuple[str, ...]], cfg: EdaConfig, synonyms: SynonymTable, seed: int,
                 epoch: int = 0) -> Augmented:
    """`cfg.num_aug` augmented copies of every row (a tuple: one text, or (text, pair), each text edited
    independently by the copy's operation), in row order; the originals are not among them."""
    cfg.check()
    enabled = [op for op in OPS if op in cfg.ops]
    candidates = [op for op in enabled for _ in range(cfg.num_aug // len(enabled) + 1)]
    copies, ops = [], []
    for row, row_texts in enumerate(texts):
        rng = row_random(seed, epoch, row)
        prepared = [_prepare(text, synonyms) for text in row_texts]
        drawn = candidates[:]
        rng.shuffle(drawn)
        for op in drawn[:cfg.num_aug]:
            copies.append(tuple(OPERATIONS[op](text, rng, cfg, synonyms) for text in prepared))
            ops.append(op)
    source = np.repeat(np.arange(len(texts), dtype=np.int64), cfg.num_aug)
    return Augmented(copies, source, ops)
