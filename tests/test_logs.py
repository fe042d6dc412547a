"""What a run shows and records: plain lines when stdout is not a terminal, --quiet, the train records of
metrics.jsonl (their loss against references), `Callback.on_log`, the "fastcls" logger, and no print() in library
code."""
import ast
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_encoder, sst2_rows, write_tsv

import fastcls
from fastcls.cli import main
from fastcls.data import collate, read_examples, tokenize_examples

ROOT = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {"kind": str, "step": int, "epoch": float, "loss": float, "lr": float, "samples_per_s": float,
              "tokens_per_s": float, "memory_mb": float, "elapsed_s": float}
LINE = re.compile(r"step (\d+)/(\d+) epoch (\d+\.\d\d) loss (\d+\.\d{4}) lr (\S+) ([\d,]+\.\d) samples/s ([\d,]+) "
                  r"tokens/s ([\d,]+) MB")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT without dropout and 16 SST-2 rows."""
    tmp = tmp_path_factory.mktemp("logs")
    make_tiny_encoder(tmp / "encoder", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    write_tsv(tmp / "train.tsv", sst2_rows(16, seed=3))
    return tmp


def settings(tmp: Path, **overrides) -> dict:
    return {**dict(model=str(tmp / "encoder"), train=str(tmp / "train.tsv"), batch_size=4, lr=3e-3, seed=2,
                   dropout=0.0, precision="fp32"), **overrides}


def records(run: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r) >= {"kind", "step", "epoch"} for r in lines)
    return [r for r in lines if r["kind"] == kind]


def test_piped_to_a_file_the_log_is_one_plain_line_per_logging_step(tiny, tmp_path):
    out = tmp_path / "run"
    argv = ["--model", tiny / "encoder", "--train", tiny / "train.tsv", "--output", out, "--max-steps", 5,
            "--batch-size", 4, "--log-every", 2, "--precision", "fp32"]
    with open(tmp_path / "train.log", "w") as log:  # stdout and stderr both into the file: not a terminal
        done = subprocess.run([sys.executable, "-m", "fastcls", "train", *map(str, argv)], stdout=log,
                              stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              timeout=300)
    text = (tmp_path / "train.log").read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    steps = [LINE.fullmatch(line) for line in lines if line.startswith("step ") and "samples/s" in line]
    assert all(steps), lines
    assert [int(m[1]) for m in steps] == [2, 4, 5] and {int(m[2]) for m in steps} == {5}
    train = records(out, "train")
    for m, record in zip(steps, train, strict=True):  # the line shows the record
        assert m[4] == f"{record['loss']:.4f}" and float(m[5]) == pytest.approx(record["lr"], rel=1e-2)
        assert float(m[6].replace(",", "")) == pytest.approx(record["samples_per_s"], abs=0.06)
        assert int(m[8].replace(",", "")) == round(record["memory_mb"]) > 0
    assert lines[0].startswith("fastcls: 16 training rows") and lines[-1].startswith("trained 5 steps in ")


def test_quiet_prints_no_step_lines_only_the_result(tiny, tmp_path, capsys):
    argv = ["train", "--model", tiny / "encoder", "--train", tiny / "train.tsv", "--max-steps", 3, "--batch-size", 4,
            "--log-every", 1, "--precision", "fp32"]
    assert main([*map(str, argv), "--output", str(tmp_path / "loud")]) == 0
    loud = capsys.readouterr().out.splitlines()
    assert sum(bool(LINE.fullmatch(line)) for line in loud) == 3 and loud[0].startswith("fastcls: ")
    assert main([*map(str, argv), "--output", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert len(quiet.out.splitlines()) == 1 and quiet.out.startswith("trained 3 steps in ")
    assert loud[-1].startswith("trained 3 steps in ")
    assert len(records(tmp_path / "quiet", "train")) == 3  # the records are written all the same
    assert logging.getLogger("fastcls").level == logging.INFO  # the command's console ended with it


class Collect(fastcls.Callback):
    def __init__(self):
        self.logged, self.steps = [], []

    def on_log(self, state, record):
        assert state.last_loss == record["loss"]
        self.logged.append(record)

    def on_step_end(self, state):
        self.steps.append(state.step)


def test_train_records_without_a_dev_set_hold_the_models_own_loss(tiny, tmp_path):
    """At a learning rate that leaves the weights where they start and one batch of every row, each step's loss is
    the start model's loss on the whole data: every record's mean must be it."""
    collect = Collect()
    result = fastcls.train(output=str(tmp_path / "run"), callbacks=[collect],
                           **settings(tiny, batch_size=16, lr=1e-12, max_steps=5, log_every=2))
    train = records(result.output, "train")
    assert records(result.output, "eval") == []
    assert [r["step"] for r in train] == [2, 4, 5] and [r["epoch"] for r in train] == [2.0, 4.0, 5.0]
    for record in train:
        assert record.keys() == TRAIN_KEYS.keys()
        assert all(type(record[key]) is kind for key, kind in TRAIN_KEYS.items()), record
        assert record["kind"] == "train" and record["lr"] < 1e-12 and record["memory_mb"] > 0
        assert all(math.isfinite(record[key]) and record[key] > 0 for key in TRAIN_KEYS if key not in ("kind", "lr"))
    assert [r["elapsed_s"] for r in train] == sorted(r["elapsed_s"] for r in train)
    assert collect.logged == train and collect.steps == [1, 2, 3, 4, 5]  # on_log: each record as written

    model = result.model
    encoded = tokenize_examples(read_examples(tiny / "train.tsv"), result.tokenizer, 256, label_map=result.labels)
    with torch.no_grad():
        loss, _ = model(collate(encoded, list(range(len(encoded))), packed=model.packed, pad_token_id=0))
    for record in train:
        assert record["loss"] == pytest.approx(loss.item(), rel=1e-5)
        # every step trains on every row: real tokens per row, whatever the clock said
        assert record["tokens_per_s"] / record["samples_per_s"] == pytest.approx(encoded.lengths.sum() / 16)


def test_a_train_records_loss_is_the_mean_since_the_previous_one_and_evaluations_keep_theirs(tiny, tmp_path):
    """The same run logged every step and every 3 steps (logging changes nothing the run computes): a record of
    the second is the mean of the first's since its previous record, an evaluation's train loss the mean since the
    previous evaluation."""
    base = settings(tiny, dev=str(tiny / "train.tsv"), epochs=3, grad_accum=2, eval_every=4)  # 2 steps an epoch
    every = records(fastcls.train(output=str(tmp_path / "every"), **base, log_every=1).output, "train")
    third = fastcls.train(output=str(tmp_path / "third"), **base, log_every=3).output
    losses = {r["step"]: r["loss"] for r in every}
    assert list(losses) == [1, 2, 3, 4, 5, 6] and len(set(losses.values())) == 6
    assert [r["step"] for r in records(third, "train")] == [3, 6]
    for record, steps in zip(records(third, "train"), ([1, 2, 3], [4, 5, 6]), strict=True):
        assert record["loss"] == pytest.approx(sum(losses[s] for s in steps) / 3, rel=1e-6)
    evaluations = records(third, "eval")
    assert [r["step"] for r in evaluations] == [4, 6]
    assert evaluations[0]["train_loss"] == pytest.approx(sum(losses[s] for s in [1, 2, 3, 4]) / 4, rel=1e-6)
    assert evaluations[1]["train_loss"] == pytest.approx((losses[5] + losses[6]) / 2, rel=1e-6)
    clockless = [{k: v for k, v in r.items() if k not in ("samples_per_s", "train_loss")} for r in evaluations]
    assert clockless == [{k: v for k, v in r.items() if k not in ("samples_per_s", "train_loss")}
                         for r in records(tmp_path / "every", "eval")]  # the same run


def test_library_lines_follow_the_standard_logging_api(tiny, tmp_path, caplog):
    """From Python, fastcls's lines are records of the "fastcls" logger: an application that configured logging
    gets them (pytest's handler here), and the logger's level silences them."""
    with caplog.at_level(logging.INFO, logger="fastcls"):
        fastcls.train(output=str(tmp_path / "a"), **settings(tiny, max_steps=2, log_every=1))
    names = {r.name for r in caplog.records}
    assert "fastcls.components.metrics" in names and all(name.startswith("fastcls.") for name in names)
    assert any(LINE.fullmatch(r.getMessage()) for r in caplog.records)
    caplog.clear()
    fastcls_logger = logging.getLogger("fastcls")
    level = fastcls_logger.level
    fastcls_logger.setLevel(logging.WARNING)
    try:
        fastcls.train(output=str(tmp_path / "b"), **settings(tiny, max_steps=2, log_every=1))
    finally:
        fastcls_logger.setLevel(level)
    assert [r for r in caplog.records if r.name.startswith("fastcls")] == []


def test_without_logging_configured_the_lines_go_to_stdout(tiny, tmp_path, capsys, monkeypatch):
    """The library default: a script that configured no logging (no root handler; pytest's taken away here)."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    fastcls.train(output=str(tmp_path / "run"), **settings(tiny, max_steps=2, log_every=1))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fastcls: ") and sum(bool(LINE.fullmatch(line)) for line in lines) == 2


def _prints(path: Path) -> list[int]:
    """Lines of print() calls outside `if __name__ == "__main__":` blocks (a script's output)."""
    found = []

    def visit(node):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def test_library_code_logs_and_never_prints():
    """Only the command line prints (its commands' output: tables, paths, results); everything else logs."""
    package = ROOT / "fastcls"
    offenders = {str(p.relative_to(ROOT)): lines for p in sorted(package.rglob("*.py"))
                 if p != package / "cli.py" and (lines := _prints(p))}
    assert offenders == {}
    assert _prints(package / "cli.py")  # the scan finds them where they are
