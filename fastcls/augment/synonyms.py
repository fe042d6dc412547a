"""Synonym tables: the bundled English one built from Princeton WordNet 3.0 (`build_wordnet.py` says how), or a
user's `word<TAB>synonym<TAB>...` file (`--synonyms FILE`, for other languages and domains), which replaces it.

Words are looked up lower-cased. The bundled table holds base forms; a word it lacks is looked up through its
regular inflection (`inflection.py`: "movies" gives "films", "pictures"...). A user's table is taken as written.
"""
import gzip
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fastcls.augment.inflection import INFLECTION_POS, base_forms, inflect
from fastcls.augment.stopwords import STOP_WORDS
from fastcls.augment.text import word_cores
from fastcls.errors import ConfigError

BUNDLED_TABLE = "wordnet_synonyms.tsv.gz"
POS_FIELDS = ("n", "v", "a", "r")  # the bundled table's fields after the word (build_wordnet.py)

_bundled: "SynonymTable | None" = None  # loaded once per process, on first use


@dataclass
class Coverage:
    """How much of a data set's vocabulary a table covers: distinct lower-cased non-stop words and their
    occurrences."""

    words: int
    covered_words: int
    occurrences: int
    covered_occurrences: int

    def describe(self) -> str:
        if not self.words:
            return "no words to look up"
        return (f"synonyms for {100 * self.covered_words / self.words:.1f}% of the {self.words:,} distinct non-stop "
                f"words ({100 * self.covered_occurrences / self.occurrences:.1f}% of their occurrences)")


class SynonymTable:
    """word -> synonyms, in a fixed order (the table's). Build one with `SynonymTable.load`."""

    def __init__(self, source: str, raw: dict[str, str], entries: dict[str, tuple[str, ...]],
                 irregular: dict[str, frozenset[str]], load_seconds: float):
        self.source = source  # one line: which table, how many words
        self.load_seconds = load_seconds
        self._raw = raw  # bundled: word -> its four POS fields, parsed on first lookup
        self._cache = entries  # word -> synonyms, filled as words are looked up (a user table: filled at load)
        self._irregular = irregular  # POS -> bases that WordNet inflects irregularly (bundled only)

    @classmethod
    def load(cls, path: str | Path | None = None) -> "SynonymTable":
        """None: the bundled WordNet 3.0 table (loaded once per process); else a user's table file."""
        global _bundled
        if path is not None:
            return _read_user_table(Path(path))
        if _bundled is None:
            _bundled = _read_bundled_table()
        return _bundled

    def synonyms(self, word: str) -> list[str]:
        return list(self.lookup(word.lower()))

    def lookup(self, word: str) -> tuple[str, ...]:
        """The synonyms of a lower-case word (the hot path: cached, no copy)."""
        found = self._cache.get(word)
        if found is None:
            found = self._cache[word] = self._resolve(word)
        return found

    def coverage(self, texts) -> Coverage:
        """Coverage of `texts`: strings, or tuples of strings (a row's texts)."""
        counts: dict[str, int] = {}
        for row in texts:
            for text in (row,) if isinstance(row, str) else row:
                for core in word_cores(text):
                    word = core.lower()
                    if word not in STOP_WORDS:
                        counts[word] = counts.get(word, 0) + 1
        covered = [n for word, n in counts.items() if self.lookup(word)]
        return Coverage(len(counts), len(covered), sum(counts.values()), sum(covered))

    def _fields(self, word: str) -> dict[str, list[str]] | None:
        raw = self._raw.get(word)
        if raw is None:
            return None
        return {pos: field.split("|") if field else [] for pos, field in zip(POS_FIELDS, raw.split("\t"), strict=True)}

    def _resolve(self, word: str) -> tuple[str, ...]:
        fields = self._fields(word)
        if fields is not None:
            return tuple(dict.fromkeys(s for pos in POS_FIELDS for s in fields[pos]))
        for base, inflection in base_forms(word) if self._raw else ():
            fields = self._fields(base)
            if fields is None:
                continue
            forms = []
            for pos in INFLECTION_POS[inflection]:
                for synonym in fields[pos]:
                    form = None if synonym in self._irregular[pos] else inflect(synonym, inflection)
                    if form is not None and form != word:
                        forms.append(form)
            if forms:
                return tuple(dict.fromkeys(forms))
        return ()


def _read_bundled_table() -> SynonymTable:
    start = time.perf_counter()
    text = gzip.decompress(resources.files("fastcls.resources").joinpath(BUNDLED_TABLE).read_bytes()).decode()
    raw, irregular = {}, {}
    for line in text.splitlines():
        word, _, rest = line.partition("\t")
        if word.startswith("!"):
            irregular[word[1:]] = frozenset(rest.split("|"))
        else:
            raw[word] = rest
    return SynonymTable(f"WordNet 3.0 (bundled, {len(raw):,} words)", raw, {}, irregular,
                        time.perf_counter() - start)


def _read_user_table(path: Path) -> SynonymTable:
    start = time.perf_counter()
    if not path.is_file():
        raise ConfigError(f"--synonyms {path}: file not found")
    entries: dict[str, list[str]] = {}
    with path.open("rb") as f:
        for number, raw_line in enumerate(f, start=1):
            try:
                line = raw_line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise ConfigError(f"--synonyms {path} line {number}: not UTF-8 text (byte 0x{raw_line[e.start]:02x})"
                                  "; save it as UTF-8") from None
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            word, *synonyms = (field.strip() for field in line.split("\t"))
            synonyms = [s for s in synonyms if s]
            if not word or not synonyms:
                raise ConfigError(f"--synonyms {path} line {number}: expected word<TAB>synonym[<TAB>synonym...], "
                                  f"got {line[:60]!r}")
            known = entries.setdefault(word.lower(), [])
            known += [s for s in synonyms if s.lower() != word.lower() and s not in known]
    if not entries:
        raise ConfigError(f"--synonyms {path}: no entries (expected lines of word<TAB>synonym[<TAB>synonym...])")
    return SynonymTable(f"{path} ({len(entries):,} words)", {},
                        {word: tuple(synonyms) for word, synonyms in entries.items()}, {},
                        time.perf_counter() - start)
