"""A run folder is never silently wrong: --model RUN_DIR continues from its weights, an interrupted --overwrite
leaves a folder that loads whole or not at all, symlinks are never written through, orphaned temporary files are
removed, and --skip-bad-rows says what it dropped."""
import json
import logging
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tiny_encoder, sst2_rows, write_tsv

import fastcls
from fastcls.cli import main
from fastcls.components.callbacks import Callback
from fastcls.config import TrainConfig
from fastcls.errors import ModelLoadError
from fastcls.models.loading import load_encoder
from fastcls.trainer import train

MODEL_FILES = ("model.safetensors", "fastcls_head.safetensors", "fastcls.json", "labels.json", "config.json")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tsv(tmp_path_factory.mktemp("data") / "train.tsv", sst2_rows(16))


def _run(tiny_bert, data, output, **settings):
    cfg = dict(model=str(tiny_bert), train=str(data), output=str(output), max_steps=2, batch_size=8, lr=1e-2,
               log_every=100, precision="fp32")
    return train(TrainConfig(**{**cfg, **settings}))


def _files(folder):
    return {name: (folder / name).read_bytes() for name in MODEL_FILES if (folder / name).is_file()}


def test_model_run_dir_continues_from_the_runs_encoder_and_head(tiny_bert, data, tmp_path, caplog):
    first = _run(tiny_bert, data, tmp_path / "first")
    saved = load_file(first.output / "model.safetensors")
    head = load_file(first.output / "fastcls_head.safetensors")

    seen = {}

    class Capture(Callback):  # the model as training starts, before any step
        def on_train_begin(self, state):
            seen.update({k: v.detach().clone() for k, v in state.model.state_dict().items()})
            state.should_stop = True

    caplog.clear()
    train(TrainConfig(model=str(first.output), train=str(data), output=str(tmp_path / "second"), max_steps=2,
                      batch_size=8, precision="fp32"), callbacks=[Capture()])
    assert "continuing from the run's checkpoint, encoder and head" in caplog.records[0].getMessage()
    encoder = {k[len("encoder."):]: v for k, v in seen.items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(v, saved[f"bert.{k}"]) for k, v in encoder.items())
    assert len(encoder) == len([k for k in saved if k.startswith("bert.") and ".pooler." not in k])
    assert torch.equal(seen["head.linear.weight"], head["weight"]) and torch.equal(seen["head.linear.bias"], head["bias"])

    # other labels: the run's encoder, a fresh head, said in the first line
    other = write_tsv(tmp_path / "other.tsv", [["pos" if label == "1" else "neg", text] for label, text in sst2_rows(16)])
    seen.clear()
    caplog.clear()
    train(TrainConfig(model=str(first.output), train=str(other), output=str(tmp_path / "third"), max_steps=2,
                      batch_size=8, precision="fp32"), callbacks=[Capture()])
    first_line = caplog.records[0].getMessage()
    assert "fresh head" in first_line and "['0', '1'] are not these ['neg', 'pos']" in first_line
    assert all(torch.equal(seen[f"encoder.{k}"], saved[f"bert.{k}"]) for k in encoder)
    assert not torch.equal(seen["head.linear.weight"], head["weight"])


def test_an_encoder_weight_the_model_has_no_place_for_is_an_error(tiny_bert, tmp_path):
    folder = shutil.copytree(tiny_bert, tmp_path / "enc")
    state = load_file(folder / "model.safetensors")
    extras = {"cls.predictions.bias": torch.zeros(3), "pooler.dense.bias": state["pooler.dense.bias"]}
    save_file({**state, **extras}, folder / "model.safetensors", metadata={"format": "pt"})
    load_encoder(folder)  # a pretraining head outside the encoder, and the pooler: expected
    stray = state["encoder.layer.1.output.dense.weight"].clone()
    for key in ("encoder.layer.2.output.dense.weight", "bert.encoder.layer.2.output.dense.weight"):
        save_file({**state, key: stray}, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ModelLoadError, match=rf"unexpected \['{key}'\]"):
            load_encoder(folder)


def test_an_interrupted_overwrite_leaves_a_folder_that_loads_whole_or_not_at_all(tiny_bert, data, tmp_path,
                                                                                monkeypatch, capsys):
    """Every state the folder passes through while run B overwrites run A: eval scores it only where its model
    files are all A's or all B's; anything else is refused in one line."""
    out = tmp_path / "run"
    _run(tiny_bert, data, out)
    old = _files(out)
    states = []
    real_replace, real_unlink = os.replace, pathlib.Path.unlink

    def record(target):
        if pathlib.Path(target).parent == out:
            states.append(shutil.copytree(out, tmp_path / f"state{len(states)}", ignore=shutil.ignore_patterns(".*")))

    monkeypatch.setattr(os, "replace", lambda src, dst, **kw: (real_replace(src, dst, **kw), record(dst))[0])
    monkeypatch.setattr(pathlib.Path, "unlink", lambda self, **kw: (real_unlink(self, **kw), record(self))[0])
    labelled = write_tsv(tmp_path / "named.tsv", [["pos" if y == "1" else "neg", t] for y, t in sst2_rows(16)])
    _run(tiny_bert, labelled, out, overwrite=True, seed=7)
    monkeypatch.undo()
    new = _files(out)
    assert len(states) > 10 and new != old
    scored = []
    capsys.readouterr()
    for state in states:
        code = main(["eval", "--model", str(state), "--data", str(labelled if _files(state) == new else data)])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        if code == 0:
            assert _files(state) in (old, new), state
            scored.append(state)
        else:
            assert code == 2 and len(err) == 1, (state, err)
    assert states[-1] in scored  # the finished run
    assert _files(states[0]) != old  # the old model went first, before anything new was written


def test_a_run_stopped_after_its_static_files_is_refused_by_eval(tiny_bert, data, tmp_path, capsys):
    out = tmp_path / "run"
    _run(tiny_bert, data, out)
    old_weights = shutil.copytree(out, tmp_path / "old", ignore=shutil.ignore_patterns("*.json", "*.txt"))

    class Killed(Callback):
        def on_train_begin(self, state):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(model=str(tiny_bert), train=str(data), output=str(out), max_steps=2, overwrite=True),
              callbacks=[Killed()])
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks model.safetensors" in err[0]
    # the old run's weights put back beside the new run's fastcls.json: of another run, refused
    for name in ("model.safetensors", "fastcls_head.safetensors"):
        shutil.copy(old_weights / name, out / name)
    assert main(["eval", "--model", str(out), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors is not from the run that fastcls.json describes" in err[0]


def test_symlinks_in_the_output_folder_are_replaced_never_written_through(tiny_bert, data, tmp_path):
    out = tmp_path / "run"
    _run(tiny_bert, data, out)
    outside = tmp_path / "outside"
    outside.mkdir()
    names = ("config.json", "metrics.jsonl", "tokenizer.json", "labels.json", "model.safetensors",
             "trainer_state.json", "fastcls.json", "tokenizer_config.json")
    for name in names:
        (outside / name).write_text(f"mine: {name}")
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(outside / name)
    _run(tiny_bert, data, out, overwrite=True, dev=str(data))
    for name in names:
        assert (outside / name).read_text() == f"mine: {name}"
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert main(["eval", "--model", str(out), "--data", str(data)]) == 0
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").symlink_to(outside / "config.json")
    assert main(["export", "--model", str(out), "--output", str(export), "--overwrite"]) == 0
    assert (outside / "config.json").read_text() == "mine: config.json"
    assert not (export / "config.json").is_symlink()


def test_the_next_run_removes_orphaned_temporary_files(tiny_bert, data, tmp_path):
    out = tmp_path / "run"
    _run(tiny_bert, data, out)
    orphans = [out / ".model.safetensors.k3j_x9a2.tmp", out / ".fastcls_head.safetensors.abcdefgh.tmp",
               out / ".trainer_state.json.0123abcd.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"half a checkpoint")
    (out / ".staging.zz9x_1y2.tmp").mkdir()
    (out / ".staging.zz9x_1y2.tmp" / "config.json").write_text("{}")
    kept = [out / "notes.tmp", out / ".model.safetensors.tmp", out / ".hidden"]
    for path in kept:
        path.write_text("user's")
    _run(tiny_bert, data, out, overwrite=True)
    assert not any(path.exists() for path in [*orphans, out / ".staging.zz9x_1y2.tmp"])
    assert all(path.read_text() == "user's" for path in kept)


def test_skip_bad_rows_drops_and_names_each_kind_of_bad_row(tiny_bert, tmp_path, capsys, caplog):
    good = ["\t".join(row) for row in sst2_rows(12)]
    lines = ["label\tsentence", *good[:2], "0\t ", *good[2:4], "1\ttoo\tmany", *good[4:8], "\tno label", "1\t",
             *good[8:]]
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_bert), "--train", str(bad), "--output", str(out), "--max-steps", "1",
            "--batch-size", "4"]
    assert main(argv) == 2 and f"{bad}:7: expected 2 fields" in capsys.readouterr().err
    assert main([*argv, "--skip-bad-rows"]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = f"{bad}: skipped 4 rows: 1 malformed (line 7), 2 empty text (lines 4, 13), 1 missing label (line 12)"
    assert printed[0] == expected
    assert "fastcls: 12 training rows" in "\n".join(printed)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["skipped_rows"] == {"train": {"malformed": 1, "empty text": 2, "missing label": 1}}
    assert main(["eval", "--model", str(out), "--data", str(bad), "--skip-bad-rows"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == expected

    # rows in memory, through the Python API: a warning of the "fastcls" logger (pytest's handler takes it)
    rows = [{"text": text, "label": label} for label, text in sst2_rows(8)] + [{"text": " ", "label": "1"}]
    caplog.clear()
    fastcls.train(model=str(tiny_bert), train=rows, output=str(tmp_path / "api"), max_steps=1, skip_bad_rows=True)
    warnings = [(r.name, r.getMessage()) for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [("fastcls.components.training_data", "<train>: skipped 1 row: 1 empty text (row 8)")]

    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "fine", "label": 1}\n{"text": \n[1]\n{"text": "", "label": 0}\n{"label": 1}\n'
                     '{"text": "ok", "label": 0}\n')
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text('text,label\nfine,1\n"a"b,0\n"",1\nok,0\n')
    for path, summary in ((jsonl, "3 malformed (lines 2, 3, 5), 1 empty text (line 4)"),
                          (csv_file, "1 malformed (line 3), 1 empty text (line 4)")):
        assert main(["eval", "--model", str(out), "--data", str(path), "--skip-bad-rows"]) == 0
        assert capsys.readouterr().out.splitlines()[0].endswith(summary), path


def test_a_checkpointer_that_did_not_write_the_folder_keeps_its_run_id(tiny_bert, data, tmp_path):
    """A run continued in its own folder (resume) saves under the id that fastcls.json already holds."""
    from fastcls.components.checkpoint import Checkpointer, load_run

    out = tmp_path / "run"
    _run(tiny_bert, data, out)
    model = load_run(out)[0]
    with torch.no_grad():
        model.head.linear.bias.add_(1.0)
    Checkpointer(out).save(model)
    assert torch.equal(load_run(out)[0].head.linear.bias, model.head.linear.bias)
