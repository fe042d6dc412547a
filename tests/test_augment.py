"""EDA: the four operations on fixed sentences, case and punctuation, stop words, reproducibility across processes,
the bundled WordNet table and user tables, and `fastcls augment` end to end."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastcls.augment import OPS, EdaConfig, SynonymTable, augment_rows
from fastcls.augment.stopwords import STOP_WORDS
from fastcls.cli import main
from fastcls.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HELLO = "Hello, World! The movie was GREAT."
FILM = "the film was good and the actors were funny ."
TABLE = "movie\tfilm\tpicture\ngreat\tsuperb\tice cream\nfilm\tmovie\ngood\tfine\tdecent\nactors\tplayers\n" \
        "funny\tamusing\thilarious\nhello\thi\n"


@pytest.fixture
def table(tmp_path) -> SynonymTable:
    path = tmp_path / "syn.tsv"
    path.write_text(TABLE)
    return SynonymTable.load(path)


def _copies(rows, table, seed=0, **settings):
    return augment_rows([(row,) for row in rows], EdaConfig(**settings), table, seed)


# seed 0, two copies of each row: n = max(1, int(alpha * words)) with 6 and 9 words (1 and 2 edits for sr; 1 for
# the others), each checked by hand: the synonyms are the table's, ALLCAPS and Title shapes carried over,
# sentence-initial capitals moved with the sentence start, punctuation in place
EXPECTED = {
    "sr": ["Hello, World! The movie was ICE CREAM.", "Hi, World! The movie was GREAT.",
           "the film was decent and the actors were hilarious .", "the film was decent and the players were funny ."],
    "ri": ["Hello, World! The movie hi was GREAT.", "Hello, World! The movie was GREAT picture.",
           "the film was good and the actors players were funny .",
           "the film was good and the hilarious actors were funny ."],
    "rs": ["The, World! Hello movie was GREAT.", "Hello, World! The was movie GREAT.",
           "the and was good film the actors were funny .", "the film was good and the were actors funny ."],
    "rd": [", World! The movie was GREAT.", "Hello, World!.", "film was good and were funny .",
           "the was good the actors ."],
}


@pytest.mark.parametrize("op", OPS)
def test_each_operation_on_fixed_sentences(op, table):
    out = _copies([HELLO, FILM], table, ops=(op,), num_aug=2, alpha_sr=0.3, alpha_ri=0.2, alpha_rs=0.2, p_rd=0.3)
    assert [texts[0] for texts in out.texts] == EXPECTED[op]
    assert out.ops == [op] * 4
    assert out.source.tolist() == [0, 0, 1, 1] and out.source.dtype == np.int64


def test_sentence_start_capital_moves_with_insertions_swaps_and_deletions(table):
    # seed 1: an insertion before a sentence's first word, a swap into it, a deletion of it
    assert _copies([HELLO], table, seed=1, ops=("ri",), num_aug=1).texts[0][0] == "Hello, World! Film the movie was GREAT."
    assert _copies([HELLO], table, seed=1, ops=("rs",), num_aug=1).texts[0][0] == "Hello, World! Was movie the GREAT."
    assert _copies([HELLO], table, seed=1, ops=("rd",), num_aug=2, p_rd=0.3).texts[0][0] == ",! Movie was GREAT."


@pytest.mark.parametrize("op", OPS)
def test_case_and_punctuation_are_kept(op, table):
    rows = [HELLO, "I think THE plot of Star Wars is good. It is funny!"]
    PROPER = {rows[0]: ("World", "GREAT"), rows[1]: ("I", "THE", "Star", "Wars")}
    out = _copies(rows, table, ops=(op,), num_aug=4, seed=3)
    for source, (text,) in zip(out.source, out.texts, strict=True):
        original = rows[source]
        for mark in ",!.":
            assert text.count(mark) == original.count(mark), (original, text)
        # every sentence starts with a capital; "I", ALLCAPS and mid-sentence capitals keep theirs
        for sentence_start in re.findall(r"(?:^|[.!?] )\W*(\w)", text):
            assert sentence_start.isupper(), text
        for word in PROPER[original]:
            assert all(found == word for found in re.findall(rf"\b{word}\b", text, re.IGNORECASE)), (original, text)
        if op == "sr" and "GREAT" in original and "GREAT" not in text:
            assert "SUPERB" in text or "ICE CREAM" in text, text


def test_stop_words_are_never_replaced(tmp_path):
    # a table that offers synonyms for stop words too: they must still never be replaced
    path = tmp_path / "syn.tsv"
    path.write_text("the\tthat\nwas\tis\nnot\tnever\nfilm\tmovie\tpicture\nfunny\tamusing\nvery\treally\n")
    table = SynonymTable.load(path)
    sentence = "the film was not very funny but the cast was"
    words = sentence.split()
    for seed in range(40):
        for (text,) in _copies([sentence], table, seed=seed, ops=("sr",), num_aug=4, alpha_sr=1.0).texts:
            out = text.split()
            assert len(out) == len(words)
            for before, after in zip(words, out, strict=True):
                assert after == before or (before not in STOP_WORDS and after in table.synonyms(before)), text


def test_deletion_never_empties_a_row(table):
    rows = ["a b c", "one", "the film was good", "Wow!", "x y", "... !", "a"]
    out = _copies(rows, table, ops=("rd",), num_aug=8, p_rd=1.0)
    for source, (text,) in zip(out.source, out.texts, strict=True):
        words = [w for w in text.split() if re.search(r"[^\W\d_]", w)]
        original_words = [w for w in rows[source].split() if re.search(r"[^\W\d_]", w)]
        assert len(words) == min(1, len(original_words)) or len(original_words) == 1, (rows[source], text)
        if len(original_words) <= 1:
            assert text == rows[source]


def test_same_output_in_processes_with_different_hash_seeds():
    script = ("from fastcls.augment import EdaConfig, SynonymTable, augment_rows\n"
              "rows = [('Hello, World! The movie was GREAT.',), ('a gripping , funny film about good actors', "
              "'the movies were dull')]\n"
              "out = augment_rows(rows, EdaConfig(num_aug=6), SynonymTable.load(), seed=7, epoch=2)\n"
              "print(repr((out.texts, out.ops)))\n")
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                              check=True)
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1] and "GREAT" in outputs[0]


def test_a_row_depends_on_seed_epoch_and_index_only(table):
    rows = [(FILM,), (HELLO,)]
    first = augment_rows(rows, EdaConfig(), table, seed=5)
    other_before = augment_rows([("something else entirely here",), (HELLO,), (FILM,)], EdaConfig(), table, seed=5)
    assert first.texts[4:] == other_before.texts[4:8]
    assert augment_rows(rows, EdaConfig(), table, seed=5).texts == first.texts
    assert augment_rows(rows, EdaConfig(), table, seed=5, epoch=1).texts != first.texts
    assert augment_rows(rows, EdaConfig(), table, seed=6).texts != first.texts


@pytest.mark.parametrize("num_aug, ops", [(4, OPS), (1, OPS), (9, OPS), (5, ("sr", "rd")), (3, ("rs",))])
def test_copies_per_row_sources_and_operation_switches(num_aug, ops, table):
    rows = [HELLO, FILM, "good"]
    out = _copies(rows, table, num_aug=num_aug, ops=ops)
    assert len(out.texts) == len(out.ops) == len(out.source) == num_aug * len(rows)
    assert out.source.tolist() == [i for i in range(len(rows)) for _ in range(num_aug)]
    assert set(out.ops) <= set(ops)
    for k in range(len(rows)):  # as the paper: at most int(num_aug / len(ops)) + 1 copies of one operation per row
        row_ops = out.ops[k * num_aug:(k + 1) * num_aug]
        assert max(row_ops.count(op) for op in ops) <= num_aug // len(ops) + 1


def test_a_pair_gets_the_same_operation_on_each_side(table):
    out = augment_rows([(HELLO, FILM)], EdaConfig(ops=("sr",), num_aug=3), table, seed=0)
    for texts in out.texts:
        assert len(texts) == 2 and texts[0] != HELLO and texts[1] != FILM


@pytest.mark.parametrize("settings, flag", [
    ({"alpha_sr": 1.5}, "--alpha-sr"), ({"alpha_ri": -0.1}, "--alpha-ri"), ({"alpha_rs": float("nan")}, "--alpha-rs"),
    ({"p_rd": 2}, "--p-rd"), ({"num_aug": 0}, "--num-aug"), ({"ops": ()}, "--eda-ops"), ({"ops": ("sr", "xx")}, "--eda-ops"),
    ({"ops": ("sr", "sr")}, "--eda-ops")])
def test_bad_settings_name_their_flag(settings, flag, table):
    with pytest.raises(ConfigError, match=re.escape(flag)):
        augment_rows([(HELLO,)], EdaConfig(**settings), table, seed=0)


def test_the_bundled_wordnet_table():
    table = SynonymTable.load()
    assert table is SynonymTable.load()  # loaded once per process
    assert re.fullmatch(r"WordNet 3\.0 \(bundled, \d{3},\d{3} words\)", table.source)
    assert "film" in table.synonyms("movie") and "movie" in table.synonyms("Film")
    assert len(table.synonyms("good")) >= 10 and "good" not in table.synonyms("good")
    assert "moving picture" in table.synonyms("movie")  # multi-word synonyms, written with spaces
    # regular inflection: plural nouns get plural synonyms, past tenses past tenses
    assert "films" in table.synonyms("movies") and all(s.endswith("s") and " " not in s
                                                       for s in table.synonyms("movies"))
    assert "shouted" in table.synonyms("cried") and all(s.endswith("ed") for s in table.synonyms("cried"))
    assert table.synonyms("xyzzyq") == []
    coverage = table.coverage([("the movie was good",), ("a xyzzyq film",)])
    assert (coverage.words, coverage.covered_words, coverage.occurrences) == (4, 3, 4)
    assert coverage.describe() == "synonyms for 75.0% of the 4 distinct non-stop words (75.0% of their occurrences)"
    assert (ROOT / "fastcls" / "resources" / "WORDNET_LICENSE").read_text().startswith("WordNet Release 3.0")


def test_the_bundled_table_loads_without_nltk_or_wn():
    script = ("import sys\nsys.modules['nltk'] = sys.modules['wn'] = None  # importing either now fails\n"
              "from fastcls.augment import SynonymTable\nt = SynonymTable.load()\n"
              "print(t.synonyms('movie')[0], t.load_seconds < 5)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["film", "True"]


def test_a_user_table_and_its_bad_lines(tmp_path):
    path = tmp_path / "my.tsv"
    path.write_text("# domain terms\n\nFilm\tMovie\tmotion picture\tfilm\ngood\tfine\nfilm\tflick\n")
    table = SynonymTable.load(path)
    assert table.source == f"{path} (2 words)"
    assert table.synonyms("film") == ["Movie", "motion picture", "flick"]
    assert table.synonyms("movies") == []  # a user's table is taken as written: no English inflection
    path.write_text("film\tmovie\n# fine\ngood\n")
    with pytest.raises(ConfigError, match=re.escape(f"--synonyms {path} line 3: expected word<TAB>synonym")):
        SynonymTable.load(path)
    path.write_bytes(b"film\tmovie\nbad\t\xff\n")
    with pytest.raises(ConfigError, match=re.escape(f"--synonyms {path} line 2: not UTF-8")):
        SynonymTable.load(path)
    with pytest.raises(ConfigError, match="file not found"):
        SynonymTable.load(tmp_path / "missing.tsv")


def _run(capsys, *argv):
    code = main(["augment", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_augment_command_on_a_tsv(tmp_path, capsys):
    data = tmp_path / "in.tsv"
    data.write_text("id\tsentence\tlabel\n7\tthe film was good and the actors were funny .\tpos\n"
                    "8\ta dull , lifeless movie\tneg\n")
    out = tmp_path / "out.tsv"
    code, printed, _ = _run(capsys, "--input", data, "--output", out, "--num-aug", 3, "--seed", 1)
    assert code == 0
    assert re.fullmatch(rf"{re.escape(str(data))}: 2 rows in, 8 rows out \(each followed by its 3 copies\) in "
                        r"[\d.]+ s; synonyms: WordNet 3\.0 \(bundled, [\d,]+ words\), synonyms for [\d.]+% of the \d+ "
                        rf"distinct non-stop words \([\d.]+% of their occurrences\); wrote {re.escape(str(out))}\n",
                        printed)
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert list(rows[0]) == ["id", "sentence", "label", "eda_source_row", "eda_operation"]
    assert [r["eda_source_row"] for r in rows] == ["0"] * 4 + ["1"] * 4
    assert [r["eda_operation"] for r in rows][::4] == ["original", "original"]
    assert all(r["eda_operation"] in OPS for i, r in enumerate(rows) if i % 4)
    assert [(r["id"], r["label"]) for r in rows] == [("7", "pos")] * 4 + [("8", "neg")] * 4
    assert rows[0]["sentence"] == "the film was good and the actors were funny ."
    # the copies are augment_rows's for the same seed
    expected = augment_rows([(rows[0]["sentence"],), (rows[4]["sentence"],)], EdaConfig(num_aug=3),
                            SynonymTable.load(), seed=1)
    assert [r["sentence"] for i, r in enumerate(rows) if i % 4] == [t[0] for t in expected.texts]

    code, _, err = _run(capsys, "--input", data, "--output", out)  # refuses to overwrite
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert _run(capsys, "--input", data, "--output", out, "--overwrite", "--num-aug", 1)[0] == 0
    assert len(out.read_text().splitlines()) == 1 + 4


def test_augment_command_on_jsonl_and_a_pair_file(tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    records = [{"text": "The movie was GREAT.", "label": 1, "meta": {"k": [1, 2]}},
               {"text": "A dull, lifeless film.", "label": 0, "meta": None}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.csv"
    assert _run(capsys, "--input", data, "--output", tmp_path / "out.jsonl", "--num-aug", 2)[0] == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["label"], r["meta"], r["eda_source_row"]) for r in rows] == \
           [(1, {"k": [1, 2]}, 0)] * 3 + [(0, None, 1)] * 3
    assert rows[0]["text"] == records[0]["text"] and rows[3]["text"] == records[1]["text"]

    pairs = tmp_path / "pairs.csv"
    pairs.write_text('premise,hypothesis,label\n"A man plays a guitar, loudly.",A person makes music.,entail\n')
    assert _run(capsys, "--input", pairs, "--output", out, "--text-pair-column", "hypothesis", "--eda-ops", "sr",
                "--num-aug", 2)[0] == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["eda_operation"] for r in rows] == ["original", "sr", "sr"]
    assert all(r["label"] == "entail" for r in rows)
    assert all(r["premise"] != rows[0]["premise"] and r["hypothesis"] != rows[0]["hypothesis"] for r in rows[1:])


@pytest.mark.parametrize("argv, named", [
    (["--alpha-sr", "1.5"], "--alpha-sr"), (["--p-rd", "-1"], "--p-rd"), (["--num-aug", "0"], "--num-aug"),
    (["--eda-ops", "sr,xx"], "--eda-ops"), (["--eda-ops", ","], "--eda-ops"), (["--synonyms", "nope.tsv"], "--synonyms"),
    (["--text-column", "nope"], "nope"), (["--output", "{tmp}/out.txt"], "--output")])
def test_augment_command_bad_input_is_one_line_exit_2(argv, named, tmp_path, capsys):
    data = tmp_path / "in.tsv"
    data.write_text("sentence\tlabel\na good film\t1\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    output = [] if "--output" in argv else ["--output", tmp_path / "out.tsv"]
    code, _, err = _run(capsys, "--input", data, *output, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out.tsv").exists()


def test_eda_flags_without_defaults_set_nothing():
    import argparse

    from fastcls.cli import _add_eda_args

    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    _add_eda_args(parser, defaults=False)
    assert vars(parser.parse_args([])) == {}
    args = parser.parse_args(["--eda-ops", "sr, rd", "--num-aug", "2", "--alpha-ri", "0.2", "--synonyms", "f.tsv"])
    assert vars(args) == {"eda_ops": ["sr", "rd"], "num_aug": 2, "alpha_ri": 0.2, "synonyms": "f.tsv"}
    parser = argparse.ArgumentParser()
    _add_eda_args(parser, defaults=True)
    assert vars(parser.parse_args([])) == {"num_aug": 4, "alpha_sr": 0.1, "alpha_ri": 0.1, "alpha_rs": 0.1,
                                           "p_rd": 0.1, "eda_ops": list(OPS), "synonyms": None}
