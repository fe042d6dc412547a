"""Multi-task runs end to end: tasks from label columns and from files, the weighted loss, task layers, the run
folder, eval / predict / export per task, and one task behaving exactly as single-task training."""
import json

import pytest
import torch
import torch.nn.functional as F
from tiny import make_tiny_encoder, sst2_rows, write_tsv
from transformers import AutoModelForSequenceClassification

from fastcls.cli import main
from fastcls.components.checkpoint import load_run
from fastcls.config import TrainConfig
from fastcls.data import collate, read_examples, tokenize_examples
from fastcls.data.collate import IGNORED_LABEL
from fastcls.models.head import MultiTaskHead
from fastcls.trainer import train


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


def _size(sentence: str) -> str:
    words = len(sentence.split())
    return "short" if words < 8 else "mid" if words < 16 else "long"


def _two_label_file(path, n=40, seed=0):
    """sentiment and size labels of SST-2 rows; some rows lack one of them (an empty cell)."""
    rows = []
    for i, (label, sentence) in enumerate(sst2_rows(n, seed)):
        rows.append(["" if i % 5 == 4 else label, "" if i % 7 == 3 and i % 5 != 4 else _size(sentence), sentence])
    return write_tsv(path, rows, header=("sentiment", "size", "sentence"))


def _softmax_segments(logits, offsets):
    return [torch.softmax(logits[:, a:b], -1) for a, b in zip(offsets, offsets[1:])]


def _hf_probabilities(folder, batch):
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return torch.softmax(hf(**batch.padded_inputs()).logits, -1)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_multi_task_head_loss_is_each_tasks_mean_weighted(impl):
    torch.manual_seed(0)
    head = MultiTaskHead(16, [2, 5, 3], dropout_p=0.0, impl=impl, weights=[0.5, 0.2, 0.3])
    h = torch.randn(11, 16, dtype=torch.float64, requires_grad=True)
    head = head.double()
    labels = torch.stack([torch.randint(0, k, (11,)) for k in (2, 5, 3)], 1)
    labels[torch.rand(11, 3) < 0.3] = IGNORED_LABEL
    labels[:, 2] = IGNORED_LABEL  # a task without a labelled row adds nothing
    loss, _ = head(h, labels)
    logits = F.linear(h, head.linear.weight, head.linear.bias)  # an independent graph
    expected = sum(w * F.cross_entropy(logits[:, a:b], labels[:, t], ignore_index=IGNORED_LABEL)
                   for t, (w, a, b) in enumerate(zip([0.5, 0.2], [0, 2], [2, 7])))
    torch.testing.assert_close(loss.double(), expected)
    grads = torch.autograd.grad(loss, [h, head.linear.weight, head.linear.bias])
    want = torch.autograd.grad(expected, [h, head.linear.weight, head.linear.bias])
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got.double(), ref)


def test_uncertainty_weighting_weights_by_exp_minus_log_variance_plus_its_half():
    torch.manual_seed(1)
    head = MultiTaskHead(8, [2, 4], dropout_p=0.0, uncertainty=True)
    with torch.no_grad():
        head.log_variance.copy_(torch.tensor([0.3, -0.7]))
    h = torch.randn(9, 8)
    labels = torch.stack([torch.randint(0, 2, (9,)), torch.randint(0, 4, (9,))], 1)
    loss, logits = head(h, labels)
    s = head.log_variance
    means = [F.cross_entropy(logits[:, :2], labels[:, 0]), F.cross_entropy(logits[:, 2:], labels[:, 1])]
    expected = sum(torch.exp(-s[t]) * means[t] + s[t] / 2 for t in range(2))
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(grad, torch.stack([-torch.exp(-s[t]) * means[t] + 0.5 for t in range(2)]).detach())


def test_two_tasks_from_label_columns_train_eval_predict_and_export(tiny_bert, tmp_path, capsys):
    data = _two_label_file(tmp_path / "train.tsv")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_bert), "--train", str(data), "--dev", str(data), "--label-column",
                 "sentiment", "--label-column", "size", "--output", str(out), "--epochs", "2", "--batch-size", "8",
                 "--lr", "1e-3", "--precision", "fp32", "--task-weight", "sentiment=0.7"]) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for task in ("sentiment", "size"):
        assert {f"{task}/accuracy", f"{task}/macro_f1", f"{task}/loss"} <= set(record)
    assert record["accuracy"] == pytest.approx((record["sentiment/accuracy"] + record["size/accuracy"]) / 2)
    labels = json.loads((out / "labels.json").read_text())
    assert [t["name"] for t in labels["tasks"]] == ["sentiment", "size"]
    assert labels["tasks"][1]["id2label"] == ["long", "mid", "short"]

    model, tokenizer, run_labels, meta = load_run(out)
    assert model.head.task_weights.tolist() == pytest.approx([0.7, 0.3])
    encoded = tokenize_examples(read_examples(data, label_column=None, require_labels=False), tokenizer,
                                meta["max_length"])
    batch = collate(encoded, range(len(encoded)), packed=False, pad_token_id=0, labels=False)
    with torch.no_grad():
        expected = _softmax_segments(model(batch)[1], run_labels.offsets)

    assert main(["predict", "--model", str(out), "--data", str(data), "--output", str(tmp_path / "p.jsonl"),
                 "--precision", "fp32"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    for t, task in enumerate(run_labels.names):
        names = run_labels.maps[t].names
        got = torch.tensor([[row[task]["probabilities"][n] for n in names] for row in rows])
        torch.testing.assert_close(got, expected[t], atol=1e-5, rtol=1e-4)
        assert [row[task]["label"] for row in rows] == [names[i] for i in expected[t].argmax(-1).tolist()]

    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(data), "--precision", "fp32",
                 "--output", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["size/accuracy"] == pytest.approx(record["size/accuracy"])
    assert "task sentiment:" in capsys.readouterr().out

    assert main(["export", "--model", str(out), "--output", str(tmp_path / "none")]) == 2
    assert "--task" in capsys.readouterr().err
    for t, task in enumerate(run_labels.names):
        folder = tmp_path / f"hf_{task}"
        assert main(["export", "--model", str(out), "--output", str(folder), "--task", task]) == 0
        torch.testing.assert_close(_hf_probabilities(folder, batch), expected[t], atol=2e-5, rtol=1e-4)
        hf_config = json.loads((folder / "config.json").read_text())
        assert list(hf_config["id2label"].values()) == run_labels.maps[t].names


def test_tasks_from_two_files_with_their_own_top_layers_export_each_task(tiny_bert, tmp_path):
    sentiment = write_tsv(tmp_path / "sst.tsv", sst2_rows(24, seed=1))
    rows = [[_size(sentence), sentence] for _, sentence in sst2_rows(16, seed=2)]
    size = write_tsv(tmp_path / "size.tsv", rows, header=("bucket", "text"))
    result = train(TrainConfig(model=str(tiny_bert), tasks=[f"sent={sentiment},{sentiment}", f"size={size},{size}:bucket"],
                               task_layers=1, task_sampling="temperature", output=str(tmp_path / "run"), epochs=2,
                               batch_size=8, lr=1e-3, precision="fp32", seed=5))
    assert {"sent/accuracy", "size/accuracy"} <= set(result.best)
    model, tokenizer, labels, meta = load_run(result.output)
    assert meta["tasks"].task_layers == 1 and model.task_layers is not None
    encoded = tokenize_examples(read_examples(sentiment), tokenizer, meta["max_length"], label_map=labels.maps[0])
    batch = collate(encoded, range(len(encoded)), packed=False, pad_token_id=0, labels=False)
    with torch.no_grad():
        expected = _softmax_segments(model(batch)[1], labels.offsets)
    for t, task in enumerate(labels.names):
        folder = tmp_path / f"hf_{task}"
        assert main(["export", "--model", str(result.output), "--output", str(folder), "--task", task]) == 0
        torch.testing.assert_close(_hf_probabilities(folder, batch), expected[t], atol=2e-5, rtol=1e-4)
    clf = result.classifier
    assert clf.tasks == ["sent", "size"]
    assert clf.predict(["a gripping film"], task="size")[0] in labels.maps[1].names
    assert set(clf.predict_proba(["a gripping film"])) == {"sent", "size"}


def test_one_task_trains_exactly_like_single_task_training(tiny_bert, tmp_path):
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(40, seed=4))
    common = dict(model=str(tiny_bert), max_steps=6, batch_size=8, lr=1e-3, precision="fp32", seed=3, dropout=0.1)
    single = train(TrainConfig(train=str(data), output=str(tmp_path / "single"), **common)).model
    multi = train(TrainConfig(tasks=[{"name": "sst", "train": str(data)}], output=str(tmp_path / "multi"),
                              **common)).model
    for (name, a), (_, b) in zip(single.encoder.named_parameters(), multi.encoder.named_parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(multi.head.linear.weight, single.head.linear.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(multi.head.linear.bias, single.head.linear.bias, atol=1e-6, rtol=1e-5)


def test_uncertainty_weighting_trains_its_log_variances(tiny_bert, tmp_path):
    data = _two_label_file(tmp_path / "train.tsv", n=24)
    result = train(TrainConfig(model=str(tiny_bert), train=str(data), label_column=["sentiment", "size"],
                               task_weighting="uncertainty", output=str(tmp_path / "run"), max_steps=4,
                               batch_size=8, lr=1e-3, precision="fp32"))
    s = result.model.head.log_variance
    assert s.shape == (2,) and bool((s != 0).all())
    model, *_ = load_run(result.output)
    torch.testing.assert_close(model.head.log_variance, s.detach())


@pytest.mark.parametrize("extra, message", [
    (["--task", "bad name=x.tsv"], "--task"),
    (["--task-layers", "1"], "--task-layers is for multi-task runs"),
    (["--label-column", "sentiment", "--label-column", "size", "--metric-task", "nope"], "--metric-task nope"),
    (["--label-column", "sentiment", "--label-column", "size", "--task-weight", "size=2"], "--task-weight"),
    (["--label-column", "sentiment", "--label-column", "size", "--task-weighting", "uncertainty", "--task-weight",
      "size=0.5"], "--task-weight"),
    (["--label-column", "sentiment", "--label-column", "size", "--label-names", "a", "b"], "--label-names"),
    (["--label-column", "sentiment", "--label-column", "size", "--task-layers", "3"], "--task-layers"),
])
def test_bad_multi_task_settings_are_one_line_and_exit_2(tiny_bert, tmp_path, capsys, extra, message):
    data = _two_label_file(tmp_path / "train.tsv", n=8)
    argv = ["train", "--model", str(tiny_bert), "--output", str(tmp_path / "out"), "--max-steps", "1"]
    if "--task" not in extra:
        argv += ["--train", str(data)]
    capsys.readouterr()
    assert main(argv + extra) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_tasks_and_weights_from_a_toml_config_file(tiny_bert, tmp_path):
    sentiment = write_tsv(tmp_path / "sst.tsv", sst2_rows(16, seed=1))
    size = write_tsv(tmp_path / "size.tsv", [[_size(s), s] for _, s in sst2_rows(12, seed=2)], header=("bucket", "text"))
    (tmp_path / "run.toml").write_text(f"""
model = "{tiny_bert}"
output = "{tmp_path / 'run'}"
max_steps = 2
batch_size = 8
task_sampling = "uniform"

[task_weights]
sent = 0.25
size = 0.75

[[tasks]]
name = "sent"
train = "{sentiment}"

[[tasks]]
name = "size"
train = "{size}"
label_column = "bucket"
""")
    assert main(["train", "--config", str(tmp_path / "run.toml")]) == 0
    model, _, labels, _ = load_run(tmp_path / "run")
    assert labels.names == ["sent", "size"] and labels.maps[1].names == ["long", "mid", "short"]
    assert model.head.task_weights.tolist() == [0.25, 0.75]


def test_freezing_into_the_task_layers_names_both_flags(tiny_bert, tmp_path, capsys):
    data = _two_label_file(tmp_path / "train.tsv", n=8)
    assert main(["train", "--model", str(tiny_bert), "--train", str(data), "--label-column", "sentiment",
                 "--label-column", "size", "--task-layers", "1", "--freeze-layers", "2", "--output",
                 str(tmp_path / "out"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--freeze-layers 2" in err and "--task-layers 1" in err
