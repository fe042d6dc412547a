"""The public Python API: fastcls.train on files or rows in memory, fastcls.load and predict on strings, your own
encoder, optimizer, scheduler and callbacks, and no process-wide state changed."""
import dataclasses

import numpy as np
import pytest
import torch
from tiny import make_tiny_encoder, sst2_rows, write_tsv
from transformers import AutoModel, pipeline

import fastcls
from fastcls.cli import main
from fastcls.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("api_encoder"))


ROWS = [{"sentence": text, "label": label} for label, text in sst2_rows(32, seed=5)]
FAST = dict(epochs=2, batch_size=8, lr=2e-3, precision="fp32", seed=3, log_every=1)


def weights(result):
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)


@pytest.fixture(scope="module")
def file_run(encoder_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("file_run")
    data = write_tsv(tmp / "train.tsv", [[r["label"], r["sentence"]] for r in ROWS])
    return fastcls.train(model=str(encoder_dir), train=str(data), dev=str(data), output=str(tmp / "out"),
                         label_names=["negative", "positive"], **FAST)


def test_rows_in_memory_train_exactly_as_the_same_rows_from_a_file(encoder_dir, file_run, tmp_path):
    pandas = pytest.importorskip("pandas")
    datasets = pytest.importorskip("datasets")
    columns = {"sentence": [r["sentence"] for r in ROWS], "label": [int(r["label"]) for r in ROWS]}
    for i, data in enumerate([ROWS, columns, pandas.DataFrame(columns), datasets.Dataset.from_dict(columns)]):
        result = fastcls.train(model=str(encoder_dir), train=data, dev=data, output=str(tmp_path / f"o{i}"),
                               label_names=["negative", "positive"], **FAST)
        assert_same_weights(weights(result), weights(file_run))
        assert result.best == {**file_run.best, "samples_per_s": result.best["samples_per_s"]}


def test_load_predicts_labels_by_name_and_probabilities(file_run):
    clf = fastcls.load(file_run.output, precision="fp32")
    texts = ["a gripping , beautiful film", "dull and far too long", "fine"]
    assert clf.labels == ["negative", "positive"]
    probs = clf.predict_proba(texts)
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1.0, atol=1e-6)
    assert clf.predict(texts) == [clf.labels[k] for k in probs.argmax(1)]
    assert clf.predict("fine") == clf.predict(["fine"])
    np.testing.assert_allclose(file_run.classifier.predict_proba(texts), fastcls.load(file_run.output).predict_proba(
        texts), atol=1e-6)
    # the training rows it has seen: fastcls.load gives the kept checkpoint's accuracy
    predicted = clf.predict([r["sentence"] for r in ROWS])
    accuracy = np.mean([p == ("positive" if r["label"] == "1" else "negative") for p, r in zip(predicted, ROWS)])
    assert accuracy == pytest.approx(file_run.best["accuracy"])
    with pytest.raises(fastcls.DataError, match="row 1"):
        clf.predict(["fine", ""])


def test_the_run_folder_is_a_transformers_pipeline_with_the_labels_by_name(file_run):
    classify = pipeline("text-classification", model=str(file_run.output), device="cpu")
    texts = ["a gripping , beautiful film", "dull and far too long"]
    got = classify(texts, top_k=None)
    expected = fastcls.load(file_run.output, precision="fp32").predict_proba(texts)
    for scores, row in zip(got, expected, strict=True):
        by_name = {s["label"]: s["score"] for s in scores}
        assert set(by_name) == {"negative", "positive"}
        np.testing.assert_allclose([by_name["negative"], by_name["positive"]], row, atol=2e-5)


def test_own_encoder_optimizer_scheduler_and_callbacks(encoder_dir, tmp_path):
    encoder = AutoModel.from_pretrained(encoder_dir)
    before = encoder.embeddings.word_embeddings.weight.detach().clone()
    made = {}

    def optimizer(groups):
        made["groups"] = groups
        return torch.optim.SGD(groups, lr=0.05)

    def scheduler(opt, total_steps):
        made["total_steps"] = total_steps
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / total_steps)

    class Recorder(fastcls.Callback):
        def __init__(self):
            self.events = []

        def on_train_begin(self, state):
            self.events.append("begin")

        def on_step_end(self, state):
            self.events.append(f"step {state.step}")
            if state.step == 3:
                state.should_stop = True

        def on_evaluate(self, state, metrics):
            self.events.append(f"evaluate {metrics['step']}")

        def on_save(self, state, path):
            self.events.append(f"save {state.step}")

        def on_train_end(self, state):
            self.events.append("end")

    recorder = Recorder()
    result = fastcls.train(encoder=encoder, tokenizer=load_tokenizer(encoder_dir), train=ROWS, dev=ROWS,
                           output=str(tmp_path / "own"), optimizer=optimizer, scheduler=scheduler,
                           callbacks=[recorder], eval_every=2, **{**FAST, "epochs": 5})
    assert result.model.encoder is encoder and result.steps == 3
    assert not torch.equal(encoder.embeddings.word_embeddings.weight, before)
    assert isinstance(made["groups"], list) and made["groups"][1]["weight_decay"] == 0.0 and made["total_steps"] == 20
    assert recorder.events == ["begin", "step 1", "save 2", "evaluate 2", "step 2", "step 3", "end"]
    assert fastcls.load(tmp_path / "own").predict(["fine"])[0] in ("0", "1")


def test_training_twice_in_one_process_leaves_config_and_global_state_alone(encoder_dir, tmp_path):
    config = fastcls.TrainConfig(model=str(encoder_dir), train=ROWS, dev=None, **FAST)
    snapshot = dataclasses.replace(config)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    first = fastcls.train(config, output=str(tmp_path / "a"))
    assert torch.equal(torch.get_rng_state(), rng)
    second = fastcls.train(config, output=str(tmp_path / "b"))
    assert config == snapshot and config.output is None
    assert_same_weights(weights(first), weights(second))


def test_bad_settings_name_the_setting(encoder_dir, tmp_path):
    with pytest.raises(fastcls.ConfigError, match="unknown settings \\['learning_rate'\\]"):
        fastcls.train(model=str(encoder_dir), train=ROWS, learning_rate=1e-3)
    with pytest.raises(fastcls.ConfigError, match="--lr .* must be float or int, got str 'fast'"):
        fastcls.train(model=str(encoder_dir), train=ROWS, lr="fast")
    with pytest.raises(fastcls.ConfigError, match="--overwrite .* must be bool"):
        fastcls.train(model=str(encoder_dir), train=ROWS, overwrite="false")
    with pytest.raises(fastcls.ConfigError, match="--lr must be a finite number"):
        fastcls.train(model=str(encoder_dir), train=ROWS, lr=float("inf"))
    with pytest.raises(fastcls.DataError, match="<train> row 1: no key .label."):
        fastcls.train(model=str(encoder_dir), train=[ROWS[0], {"sentence": "x"}], output=str(tmp_path / "x"))


def test_the_cli_shows_user_errors_in_one_line_and_bugs_with_their_traceback(monkeypatch, capsys):
    import fastcls.cli as cli

    def bug(args):
        raise ValueError("an internal mistake")

    monkeypatch.setitem(cli.COMMANDS, "info", bug)
    with pytest.raises(ValueError, match="an internal mistake"):
        main(["info"])

    def user_error(args):
        raise fastcls.ConfigError("--lr must be > 0")

    monkeypatch.setitem(cli.COMMANDS, "info", user_error)
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "fastcls info: error: --lr must be > 0\n"
