"""Text as EDA edits it, natural for cased models: split on whitespace into tokens, each [leading punctuation,
core, trailing punctuation, ...]; the operations move, replace, insert and delete the cores of words (cores with a
letter) and leave punctuation where it was. `render` joins the tokens with single spaces and keeps sentence-initial
capitals at the start of each sentence: a word moved to a sentence start is capitalised (where the text
capitalises its first word), and a word moved away from one is lower-cased unless it looks like a proper noun ("I",
ALLCAPS, or capitalised mid-sentence in the original, which it then was not)."""
import re

# a token is a list: [lead, core, trail, is_word, was_start, start_cap] (lists, copied before any change, because a
# row's tokens are shared by its copies)
LEAD, CORE, TRAIL, IS_WORD, WAS_START, START_CAP = range(6)

_TOKEN = re.compile(r"(\W*)(.*?)(\W*)", re.DOTALL)  # \W: neither letter, digit nor underscore
_LETTER = re.compile(r"[^\W\d_]")
SENTENCE_END = frozenset(".!?")


def tokenize(text: str) -> tuple[list[list], bool]:
    """(tokens, cased): `cased` when the text's first word is capitalised, so new sentence starts are too."""
    tokens, at_start, cased = [], True, None
    for piece in text.split():
        lead, core, trail = ("", piece, "") if piece.isalpha() else _TOKEN.fullmatch(piece).groups()
        if piece.isalpha() or _LETTER.search(core):
            if cased is None:
                cased = core[0].isupper()
            start_cap = at_start and core[0].isupper() and not looks_proper(core)
            tokens.append([lead, core, trail, True, at_start, start_cap])
            at_start = False
        else:
            tokens.append([lead, core, trail, False, False, False])
        if ends_sentence(lead, core, trail):
            at_start = True
    return tokens, bool(cased)


def word_cores(text: str):
    """The core of every word of `text`, in order."""
    for piece in text.split():
        core = _TOKEN.fullmatch(piece).group(2)
        if _LETTER.search(core):
            yield core


def looks_proper(core: str) -> bool:
    """A word that keeps its capital anywhere: I (I'm, I'd...), or ALLCAPS."""
    return core == "I" or core.startswith("I'") or (len(core) > 1 and core.isupper())


def ends_sentence(lead: str, core: str, trail: str) -> bool:
    """A token whose trailing punctuation (or, for punctuation alone, its only text) holds . ! or ?"""
    return not SENTENCE_END.isdisjoint(trail or ("" if core else lead))


def shaped(word: str, like: str) -> str:
    """`word` in the case shape of `like`: ALLCAPS, Capitalised, or as it is."""
    if len(like) > 1 and like.isupper():
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def render(tokens: list[list], cased: bool) -> str:
    if not cased and not any(token[START_CAP] for token in tokens):  # no capital to move: lower-cased text
        return " ".join([lead + core + trail for lead, core, trail, *_ in tokens])
    parts, at_start = [], True
    for lead, core, trail, is_word, was_start, start_cap in tokens:
        if is_word:
            if at_start and not was_start and cased:
                core = core[:1].upper() + core[1:]
            elif was_start and not at_start and start_cap:
                core = core[:1].lower() + core[1:]
            at_start = False
        parts.append(lead + core + trail)
        if ends_sentence(lead, core, trail):
            at_start = True
    return " ".join(parts)
