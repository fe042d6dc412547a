"""The loop end to end: tiny random encoders for speed, the real bundled MiniLM where it matters."""
import csv
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tiny_encoder, sst2_rows, write_tsv
from transformers import AutoModelForSequenceClassification

from fastcls.cli import main
from fastcls.components.callbacks import Callback
from fastcls.components.checkpoint import load_run
from fastcls.config import BUNDLED_DEV, BUNDLED_TRAIN, TrainConfig, bundled_model_path
from fastcls.data import collate, read_examples, tokenize_examples
from fastcls.errors import ModelLoadError, TrainingError
from fastcls.export import export_hf
from fastcls.trainer import train


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def overfit_run(tiny_bert, tmp_path_factory):
    """A tiny BERT trained on 32 rows with string labels, evaluated once at the end on the same rows."""
    tmp = tmp_path_factory.mktemp("overfit")
    rows = [["pos" if label == "1" else "neg", text] for label, text in sst2_rows(32)]
    data = write_tsv(tmp / "train.tsv", rows)
    cfg = TrainConfig(model=str(tiny_bert), train=str(data), dev=str(data), output=str(tmp / "out"), epochs=40,
                      batch_size=8, lr=3e-3, warmup=0.1, dropout=0.0, seed=1, eval_every=10_000, log_every=5)
    return train(cfg), data


def test_tiny_bert_overfits_32_examples(overfit_run):
    result, _ = overfit_run
    assert result.best["accuracy"] == 1.0
    out = result.output
    for name in ("model.safetensors", "config.json", "fastcls.json", "labels.json", "tokenizer.json",
                 "train_config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "labels.json").read_text())["id2label"] == ["neg", "pos"]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"kind", "step", "epoch", "train_loss", "accuracy", "macro_f1", "samples_per_s"} <= set(record)
    assert record["kind"] == "eval"
    assert record["step"] == result.steps == 160


def test_save_load_predict_gives_the_same_probabilities(overfit_run, tmp_path):
    result, data = overfit_run
    model, tokenizer, labels, meta = load_run(result.output)
    encoded = tokenize_examples(read_examples(data), tokenizer, meta["max_length"], label_map=labels)
    with torch.no_grad():
        expected = torch.softmax(result.model.eval()(_batch(encoded, range(len(encoded)), model.packed))[1], -1)
    argv = ["predict", "--model", str(result.output), "--data", str(data), "--output", str(tmp_path / "p.jsonl")]
    assert main([*argv, "--precision", "fp32"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    got = torch.tensor([[r["probabilities"][n] for n in labels.names] for r in rows])
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-4)
    assert [r["label"] for r in rows] == [labels.names[i] for i in expected.argmax(-1).tolist()]


def _batch(encoded, indices, packed=False):
    return collate(encoded, list(indices), packed=packed, pad_token_id=0)


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra", "distilbert", "mpnet"])
def test_run_folder_and_export_load_in_transformers_with_the_same_predictions(model_type, tmp_path):
    encoder = make_tiny_encoder(tmp_path / "enc", model_type)
    rows = sst2_rows(24, seed=3)
    data = write_tsv(tmp_path / "train.tsv", rows)
    result = train(TrainConfig(model=str(encoder), train=str(data), dev=str(data), output=str(tmp_path / "out"),
                               epochs=1, batch_size=8, lr=1e-3, seed=0, precision="fp32",
                               label_names=["negative", "positive"]))
    model, tokenizer, labels, meta = load_run(result.output)
    encoded = tokenize_examples(read_examples(data), tokenizer, meta["max_length"], label_map=labels)
    batch = _batch(encoded, range(len(encoded)))
    with torch.no_grad():
        expected = torch.softmax(model(batch)[1], -1)
        for folder in (result.output, export_hf(result.output, tmp_path / "hf")):
            hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            inputs = {k: v for k, v in batch.padded_inputs().items() if k != "token_type_ids" or model_type == "bert"}
            got = torch.softmax(hf(**inputs).logits, -1)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
            assert hf.config.id2label == {0: "negative", 1: "positive"}


def test_nan_loss_stops_with_a_clear_error_and_keeps_files(tiny_bert, tmp_path, monkeypatch):
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(16))
    head_module = sys.modules["fastcls.ops.classification_head"]  # the package exports a function of that name
    monkeypatch.setattr(head_module, "cross_entropy", lambda logits, target, **_: logits.sum() * float("nan"))
    cfg = TrainConfig(model=str(tiny_bert), train=str(data), output=str(tmp_path / "out"), max_steps=4,
                      batch_size=8, log_every=2)
    with pytest.raises(TrainingError, match="loss is nan at step 2"):
        train(cfg)
    assert (tmp_path / "out" / "labels.json").is_file()


def test_an_output_that_is_a_file_or_a_non_empty_folder_is_refused_and_left_alone(tiny_bert, tmp_path, capsys):
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(8))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    a_file = tmp_path / "a_file"
    a_file.write_text("notes")
    for output, why in ((mine, "is not empty"), (a_file, "is a file")):
        code = main(["train", "--model", str(tiny_bert), "--train", str(data), "--output", str(output),
                     "--max-steps", "1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"--output {output} {why}" in err[0]
    assert (mine / "config.json").read_text() == '{"my": "settings"}' and len(list(mine.iterdir())) == 1
    assert a_file.read_text() == "notes"


class _BreakAWeight(Callback):
    def __init__(self, where):
        self.where = where

    def on_step_end(self, state):
        if state.step == 1:
            with torch.no_grad():
                self.where(state.model)[0] = float("nan")


def test_non_finite_weights_are_never_saved(tiny_bert, tmp_path):
    """A position no text reaches: its NaN leaves every loss finite, so only the weights check can catch it."""
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(16))
    cfg = TrainConfig(model=str(tiny_bert), train=str(data), dev=str(data), output=str(tmp_path / "out"),
                      max_steps=4, batch_size=8, log_every=100, eval_every=2)
    unused_position = _BreakAWeight(lambda model: model.encoder.embeddings.position_embeddings.weight[127])
    with pytest.raises(TrainingError, match=r"weights are non-finite at step 2 \(first: encoder.embeddings.position"):
        train(cfg, callbacks=[unused_position])
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_non_finite_loss_between_logging_steps_stops_the_run_before_the_save(tiny_bert, tmp_path):
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(16))
    cfg = TrainConfig(model=str(tiny_bert), train=str(data), dev=str(data), output=str(tmp_path / "out"),
                      max_steps=4, batch_size=8, log_every=100, eval_every=2)
    head = _BreakAWeight(lambda model: model.head.linear.weight[0])
    with pytest.raises(TrainingError, match=r"training loss is nan at step 2"):
        train(cfg, callbacks=[head])
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_cli_names_the_file_and_line_or_argument(tiny_bert, overfit_run, tmp_path, capsys):
    good = write_tsv(tmp_path / "good.tsv", sst2_rows(8))
    bad_row = tmp_path / "bad.tsv"
    bad_row.write_text("label\tsentence\n1\tfine\n0\ttoo\tmany\n")
    unseen = write_tsv(tmp_path / "unseen.tsv", [["neg", "a"], ["maybe", "b"]])
    result, _ = overfit_run
    cases = [
        (["train", "--model", str(tmp_path / "nope"), "--train", str(good)], "model folder not found"),
        (["train", "--model", str(tiny_bert), "--train", str(bad_row)], "bad.tsv:3"),
        (["train", "--model", str(tiny_bert), "--train", str(good), "--max-length", "2"], "--max-length"),
        (["train", "--model", str(tiny_bert), "--train", str(tmp_path / "missing.tsv")], "missing.tsv"),
        (["eval", "--model", str(result.output), "--data", str(unseen)], "unseen.tsv:3"),
        (["eval", "--model", str(tiny_bert), "--data", str(good)], "lacks fastcls.json"),
        (["train", "--model", str(tiny_bert), "--train", str(good), "--output", str(result.output)], "already holds"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_eval_cli_prints_accuracy_and_per_class(overfit_run, capsys):
    result, data = overfit_run
    assert main(["eval", "--model", str(result.output), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "accuracy 1.0000" in out and "macro-F1 1.0000" in out and "neg" in out and "pos" in out


@pytest.mark.slow
def test_minilm_beats_chance_on_sst2_after_a_few_dozen_steps(tmp_path):
    cfg = TrainConfig(train=str(BUNDLED_TRAIN), dev=str(BUNDLED_DEV), output=str(tmp_path / "out"),
                      max_steps=40, batch_size=32, lr=1e-4, warmup=0.1, seed=0)
    result = train(cfg)
    # chance is 0.51 on SST-2 dev (444 positive of 872)
    assert result.best["accuracy"] > 0.70


def test_default_train_command_runs_on_the_bundled_model_and_data(tmp_path, capsys):
    out = tmp_path / "default"
    assert main(["train", "--max-steps", "3", "--output", str(out), "--eval-every", "3"]) == 0
    assert "best dev: step 3" in capsys.readouterr().out
    config = json.loads((out / "train_config.json").read_text())
    assert config["model"] == bundled_model_path() and config["train"] == str(BUNDLED_TRAIN)


def test_early_stopping_stops_when_the_metric_stalls(tiny_bert, tmp_path):
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(16))
    # a learning rate this small leaves dev accuracy where it starts: the second evaluation brings no gain
    cfg = TrainConfig(model=str(tiny_bert), train=str(data), dev=str(data), output=str(tmp_path / "out"),
                      max_steps=50, batch_size=8, lr=1e-12, eval_every=1, patience=1)
    result = train(cfg)
    assert result.steps == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["eval", "eval"]
    assert result.best["step"] == 1


def test_flags_override_the_config_file(tiny_bert, tmp_path):
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(16))
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"model": str(tiny_bert), "train": str(data), "batch-size": 4, "max_steps": 2,
                                  "lr": 1e-3}))
    assert main(["train", "--config", str(config), "--max-steps", "3", "--output", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert (saved["batch_size"], saved["max_steps"], saved["lr"]) == (4, 3, 1e-3)
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["steps"] == 3


def test_mismatched_checkpoint_is_refused_with_the_file_named(overfit_run, tmp_path):
    result, _ = overfit_run
    broken = shutil.copytree(result.output, tmp_path / "broken")
    (broken / "labels.json").write_text(json.dumps({"id2label": ["a", "b", "c"]}))
    with pytest.raises(ModelLoadError, match="labels.json has 3 labels, fastcls.json 2"):
        load_run(broken)
    shutil.copy(result.output / "labels.json", broken / "labels.json")
    head = load_file(broken / "fastcls_head.safetensors")
    save_file({"weight": torch.randn(5, head["weight"].shape[1]), "bias": head["bias"]},
              broken / "fastcls_head.safetensors")
    with pytest.raises(ModelLoadError, match="different checkpoints"):
        load_run(broken)
    shutil.copy(result.output / "fastcls_head.safetensors", broken / "fastcls_head.safetensors")
    state = load_file(broken / "model.safetensors")
    state["bert.embeddings.word_embeddings.weight"] = state["bert.embeddings.word_embeddings.weight"][:, :5].clone()
    save_file(state, broken / "model.safetensors", metadata=dict(
        __import__("safetensors").safe_open(result.output / "model.safetensors", "pt").metadata()))
    with pytest.raises(ModelLoadError, match="model.safetensors does not match"):
        load_run(broken)


def test_predict_writes_csv_for_an_unlabelled_file(overfit_run, tmp_path):
    result, _ = overfit_run
    data = tmp_path / "new.csv"
    data.write_text('text\n"a quiet, lovely film"\n"dull, and far too long"\nfine\n')
    assert main(["predict", "--model", str(result.output), "--data", str(data), "--output", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["label"] for r in rows} <= {"neg", "pos"}
    for r in rows:
        assert float(r["prob_neg"]) + float(r["prob_pos"]) == pytest.approx(1.0, abs=1e-5)


def test_grad_accumulation_and_eval_interval_count_optimizer_steps(tiny_bert, tmp_path):
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(40))
    cfg = TrainConfig(model=str(tiny_bert), train=str(data), dev=str(data), output=str(tmp_path / "out"), epochs=2,
                      batch_size=8, grad_accum=2, eval_every=2, precision="fp32")
    result = train(cfg)
    # 5 micro-batches an epoch make 3 optimizer steps (the last one of a single micro-batch): 6 in 2 epochs
    assert result.steps == 6
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4, 6]
    assert [r["step"] for r in records if r["kind"] == "train"] == [6]  # --log-every 10: the last step only


def _final_weights(result):
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def test_cached_frozen_prefix_trains_exactly_as_recomputing_it(tiny_bert, tmp_path, monkeypatch):
    """Later epochs read the frozen prefix's output from the cache instead of recomputing it: with the cache
    kept in fp32 the trained weights are the same (to rounding: a key bias's gradient is pure rounding noise,
    as softmax ignores it); the report counts what the cache served."""
    import fastcls.components.prefix_cache as cache_module
    from fastcls.components.prefix_cache import PrefixCache

    monkeypatch.setattr(cache_module, "PrefixCache", lambda *a, **k: PrefixCache(*a, **k, dtype=torch.float32))
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(40))
    initial = load_file(tiny_bert / "model.safetensors")
    results = {}
    for cache in (True, False):
        cfg = TrainConfig(model=str(tiny_bert), train=str(data), output=str(tmp_path / f"out{cache}"), epochs=3,
                          batch_size=8, precision="fp32", freeze_embeddings=True, freeze_layers=1,
                          cache_frozen=cache, seed=3)
        results[cache] = train(cfg)
    cached, recomputed = results[True], results[False]
    for name, value in _final_weights(recomputed).items():
        torch.testing.assert_close(_final_weights(cached)[name], value, atol=1e-6, rtol=1e-5, msg=name)
    for name, value in initial.items():  # the frozen prefix did not move
        if name.startswith(("embeddings.", "encoder.layer.0.")):
            torch.testing.assert_close(_final_weights(cached)[f"encoder.{name}"], value, atol=0, rtol=0)
    assert not torch.equal(_final_weights(cached)["encoder.encoder.layer.1.output.dense.weight"],
                           initial["encoder.layer.1.output.dense.weight"])
    report = cached.frozen
    assert report["cache"] == "on" and report["cache_rows"] == 40 and report["cache_hits"] == 80
    assert report["frozen_params"] > 0 and report["trainable_params"] > 0 and len(report["epoch_seconds"]) == 3
    assert recomputed.frozen["cache"] == "off (--no-cache-frozen)"
    state = json.loads((cached.output / "trainer_state.json").read_text())
    assert state["frozen"]["cache_hits"] == 80


def test_unpadded_and_padded_batches_train_the_same_model(tmp_path):
    # without dropout: the mask-free kernels draw each element's bit from its position in the tensor
    encoder = make_tiny_encoder(tmp_path / "encoder", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(24))
    results = []
    for unpad in ("on", "off"):
        cfg = TrainConfig(model=str(encoder), train=str(data), output=str(tmp_path / f"out{unpad}"), epochs=1,
                          batch_size=8, precision="fp32", dropout=0.0, unpad=unpad, seed=2)
        results.append(_final_weights(train(cfg)))
    for name, value in results[1].items():
        torch.testing.assert_close(results[0][name], value, atol=2e-6, rtol=1e-4, msg=name)


def test_checkpointed_run_with_frozen_layers_trains_the_upper_layers(tiny_bert, tmp_path):
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(16))
    initial = load_file(tiny_bert / "model.safetensors")
    cfg = TrainConfig(model=str(tiny_bert), train=str(data), output=str(tmp_path / "out"), epochs=1, batch_size=8,
                      freeze_layers=1, grad_checkpointing=True, seed=4)
    weights = _final_weights(train(cfg))
    assert torch.equal(weights["encoder.encoder.layer.0.attention.self.query.weight"],
                       initial["encoder.layer.0.attention.self.query.weight"])
    assert not torch.equal(weights["encoder.encoder.layer.1.attention.self.query.weight"],
                           initial["encoder.layer.1.attention.self.query.weight"])


def test_freezing_more_layers_than_the_model_has_names_the_flag(tiny_bert, tmp_path, capsys):
    data = write_tsv(tmp_path / "train.tsv", sst2_rows(8))
    code = main(["train", "--model", str(tiny_bert), "--train", str(data), "--output", str(tmp_path / "o"),
                 "--freeze-layers", "5"])
    assert code == 2 and "--freeze-layers 5" in capsys.readouterr().err
