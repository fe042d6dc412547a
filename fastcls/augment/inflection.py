"""English regular inflection for the bundled WordNet table, which holds base forms only: `base_forms` undoes a
regular suffix (as NLTK's morphy does: nouns -s/-es/-ies, verbs -s/-ed/-ing, adjectives -er/-est) and `inflect`
puts the same suffix on a synonym, so that "movies" is replaced by "films" and "walked" by "strolled".

A synonym is inflected only where the regular rule is sure to be right: a single lower-case word, not one of
WordNet's irregular bases for that part of speech (its exception lists: "child", "go", "big"...), not a noun or
verb ending in -o (potatoes or photos?), and for -er/-est only an adjective of one syllable, or two ending in -y
(longer ones take "more"). Anything else is left out of the inflected synonyms.
"""
import re

# (suffix, replacement, inflection), tried in this order: the first base form with synonyms wins
SUFFIX_RULES = (
    ("s", "", "s"), ("ses", "s", "s"), ("xes", "x", "s"), ("zes", "z", "s"), ("ches", "ch", "s"),
    ("shes", "sh", "s"), ("ies", "y", "s"), ("es", "", "s"),
    ("ed", "e", "ed"), ("ed", "", "ed"), ("ied", "y", "ed"),
    ("ing", "e", "ing"), ("ing", "", "ing"), ("ying", "ie", "ing"),
    ("er", "", "er"), ("er", "e", "er"), ("ier", "y", "er"),
    ("est", "", "est"), ("est", "e", "est"), ("iest", "y", "est"),
)
# the parts of speech (fields of the table: n, v, a) that take each inflection
INFLECTION_POS = {"s": ("n", "v"), "ed": ("v",), "ing": ("v",), "er": ("a",), "est": ("a",)}

_LOWER_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")
VOWELS = "aeiou"


def base_forms(word: str):
    """(base, inflection) candidates of a lower-case word, in the order to try them."""
    for suffix, replacement, inflection in SUFFIX_RULES:
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            yield word[: -len(suffix)] + replacement, inflection


def _syllables(word: str) -> int:
    groups = len(_VOWEL_GROUPS.findall(word))
    return groups - 1 if word.endswith("e") and not word.endswith(("ee", "ye")) and groups > 1 else groups


def inflect(word: str, inflection: str) -> str | None:
    """`word` with the regular `inflection` (s, ed, ing, er, est), or None where the rule may be wrong."""
    if not _LOWER_WORD.fullmatch(word):
        return None
    consonant_y = word.endswith("y") and len(word) > 1 and word[-2] not in VOWELS
    if inflection == "s":
        if word.endswith("o"):
            return None
        if word.endswith(("s", "x", "z", "ch", "sh")):
            return word + "es"
        return word[:-1] + "ies" if consonant_y else word + "s"
    if inflection == "ed":
        if word.endswith("e"):
            return word + "d"
        return word[:-1] + "ied" if consonant_y else word + "ed"
    if inflection == "ing":
        if word.endswith("ie"):
            return word[:-2] + "ying"
        if word.endswith("e") and not word.endswith(("ee", "ye", "oe")):
            return word[:-1] + "ing"
        return word + "ing"
    syllables = _syllables(word)
    if syllables > 2 or (syllables == 2 and not consonant_y):
        return None
    if word.endswith("e"):
        return word + inflection[1:]
    return word[:-1] + "i" + inflection if consonant_y else word + inflection
