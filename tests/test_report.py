"""Loggers (--report-to tensorboard) and charts (fastcls plot, --plot): the event file read back with TensorBoard's
own reader holds the run's records under the HF Trainer's names, and the chart's lines are the records."""
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_run_inputs

import fastcls
from fastcls.cli import main
from fastcls.components.reporters import eval_scalars
from fastcls.config import TrainConfig
from fastcls.errors import ConfigError
from fastcls.plot import draw_metrics, read_metrics

THROUGHPUT = ("train/samples_per_second", "train/tokens_per_second", "train/memory_mb")  # depend on the clock


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny BERT and 40 SST-2 rows: 5 batches of 8 per epoch."""
    return tiny_run_inputs(tmp_path_factory.mktemp("report"), 40, seed=7)


def settings(tmp: Path, **overrides) -> dict:
    """10 steps, logged every 2, evaluated every 3 and at the end."""
    return {**dict(model=str(tmp / "encoder"), train=str(tmp / "train.tsv"), dev=str(tmp / "train.tsv"), batch_size=8,
                   lr=2e-3, seed=5, epochs=2, log_every=2, eval_every=3), **overrides}


class Records(fastcls.Callback):
    def __init__(self):
        self.train, self.evals = [], []

    def on_log(self, state, record):
        self.train.append(record)

    def on_evaluate(self, state, metrics):
        self.evals.append(metrics)


class Boom(fastcls.Callback):
    def on_step_end(self, state):
        if state.step == 5:
            raise RuntimeError("boom")


def scalars(folder: Path) -> dict:
    """Every scalar in the event files of `folder`, by tag: [(step, value)], as TensorBoard shows them (with what a
    resumed run's purge_step drops dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def logging_folder(run: Path) -> Path:
    (folder,) = (run / "runs").iterdir()
    return folder


def f32(value: float) -> float:
    return float(np.float32(value))  # TensorBoard stores scalars as float32


@pytest.fixture(scope="module")
def reported_run(tiny_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("reported") / "run"
    records = Records()
    fastcls.train(output=str(run), report_to="tensorboard", callbacks=[records], **settings(tiny_dir))
    return run, records


def test_tensorboard_holds_the_records_under_the_hf_trainers_names(reported_run):
    run, records = reported_run
    got = scalars(logging_folder(run))
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert records.train == train and [r["step"] for r in train] == [2, 4, 6, 8, 10]
    for key, tag in (("loss", "train/loss"), ("lr", "train/learning_rate"), ("epoch", "train/epoch"),
                     ("samples_per_s", "train/samples_per_second"), ("tokens_per_s", "train/tokens_per_second")):
        assert got[tag] == [(r["step"], f32(r[key])) for r in records.train], tag
    assert "train/memory_mb" not in got or got["train/memory_mb"] == [
        (r["step"], f32(r["memory_mb"])) for r in records.train if r["memory_mb"] is not None]
    evals = [r for r in read_metrics(run) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6, 9, 10]
    assert [{k: v for k, v in r.items() if k != "kind"} for r in evals] == [
        {k: v for k, v in r.items() if k != "kind"} for r in records.evals]
    for key, tag in (("accuracy", "eval/accuracy"), ("macro_f1", "eval/macro_f1"), ("dev_loss", "eval/loss")):
        assert got[tag] == [(r["step"], f32(r[key])) for r in evals], tag
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(logging_folder(run)))
    reader.Reload()
    text = reader.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text)["lr"] == 2e-3 and json.loads(text)["report_to"] == ["tensorboard"]
    text = reader.Tensors("model_config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text)["hidden_size"] == 32


def test_a_multi_task_records_task_metrics_go_under_eval_task():
    record = {"step": 3, "epoch": 0.6, "train_loss": 0.7, "samples_per_s": 9.0, "accuracy": 0.5, "macro_f1": 0.4,
              "dev_loss": 0.9, "a/accuracy": 0.6, "a/macro_f1": 0.5, "a/loss": 0.8, "b/accuracy": 0.4,
              "b/macro_f1": 0.3, "b/loss": 1.0, "per_class": {"a": {}, "b": {}}}
    assert eval_scalars(record) == {"eval/loss": 0.9, "eval/accuracy": 0.5, "eval/macro_f1": 0.4,
                                    "eval/a/accuracy": 0.6, "eval/a/macro_f1": 0.5, "eval/a/loss": 0.8,
                                    "eval/b/accuracy": 0.4, "eval/b/macro_f1": 0.3, "eval/b/loss": 1.0}


def test_a_resumed_run_continues_its_event_folder_and_shows_each_step_once(tiny_dir, tmp_path):
    from test_resume import StopAt

    whole, part = tmp_path / "whole", tmp_path / "part"
    fastcls.train(output=str(whole), report_to="tensorboard", **settings(tiny_dir))
    # stopped after step 4 (logged), resumed from the checkpoint of step 3: TensorBoard drops the first step 4
    fastcls.train(output=str(part), report_to="tensorboard", save_every=3, callbacks=[StopAt(4)],
                  **settings(tiny_dir))
    fastcls.train(resume=str(part))
    assert len(list(logging_folder(part).iterdir())) == 2  # two event files in one folder
    expected = {tag: values for tag, values in scalars(logging_folder(whole)).items() if tag not in THROUGHPUT}
    got = {tag: values for tag, values in scalars(logging_folder(part)).items() if tag not in THROUGHPUT}
    assert got == expected and [step for step, _ in got["train/loss"]] == [2, 4, 6, 8, 10]


def test_a_failing_run_keeps_its_events(tiny_dir, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        fastcls.train(output=str(tmp_path / "run"), report_to=["tensorboard"], callbacks=[Boom()],
                      **settings(tiny_dir))
    # closed: no writer thread left behind; flushed after each record: every record before the failure is there
    assert not [t for t in threading.enumerate() if type(t).__name__ == "_AsyncWriterThread"]
    got = scalars(logging_folder(tmp_path / "run"))
    assert [s for s, _ in got["train/loss"]] == [2, 4]
    assert [s for s, _ in got["eval/accuracy"]] == [3]


def test_logging_dir_and_report_to_values(tiny_dir, tmp_path):
    fastcls.train(output=str(tmp_path / "run"), report_to="all", logging_dir=str(tmp_path / "tb"),
                  **settings(tiny_dir, max_steps=2, dev=None))
    assert [s for s, _ in scalars(tmp_path / "tb")["train/loss"]] == [2]
    assert not (tmp_path / "run" / "runs").exists()
    assert TrainConfig(report_to="all").resolve().report_to == ["tensorboard"]
    assert TrainConfig(report_to=["tensorboard,tensorboard"]).resolve().report_to == ["tensorboard"]
    assert TrainConfig(report_to="none").resolve().report_to == []
    with pytest.raises(ConfigError, match="--report-to must be none, all or any of tensorboard, got 'wandb'"):
        TrainConfig(report_to="tensorboard,wandb").resolve()
    with pytest.raises(ConfigError, match="--plot"):
        TrainConfig(plot="yes").resolve()


@pytest.mark.parametrize("blocked, argv, extra", [
    ("tensorboard", ["train", "--report-to", "tensorboard"], "tensorboard"),
    ("matplotlib", ["train", "--plot"], "plot"),
    ("matplotlib", ["plot", "{run}"], "plot"),
])
def test_a_missing_package_names_its_extra_before_any_work(tiny_dir, tmp_path, reported_run, blocked, argv, extra):
    out = tmp_path / "out"
    train = ["--model", str(tiny_dir / "encoder"), "--train", str(tiny_dir / "train.tsv"), "--output", str(out)]
    argv = [a.format(run=reported_run[0]) for a in argv] + (train if argv[0] == "train" else [])
    code = (f"import sys; sys.modules[{blocked!r}] = None; from fastcls.cli import main; "
            f"sys.exit(main({argv!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f'pip install "fastcls[{extra}]"')
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_the_charts_lines_are_the_records():
    train = [{"kind": "train", "step": s, "epoch": s / 10, "loss": 1 / s, "lr": 1e-3 * s, "samples_per_s": 100.0 + s,
              "tokens_per_s": 1e4, "memory_mb": None, "elapsed_s": s} for s in (2, 4, 6)]
    evals = [{"kind": "eval", "step": s, "epoch": s / 10, "train_loss": 0.5, "samples_per_s": 99.0,
              "accuracy": 0.5 + s / 100, "macro_f1": 0.4 + s / 100, "dev_loss": 0.9 - s / 100,
              "a/accuracy": 0.6, "a/macro_f1": 0.55, "a/loss": 0.8, "b/accuracy": 0.4, "b/macro_f1": 0.35,
              "b/loss": 1.0, "per_class": {}} for s in (3, 6)]
    figure = draw_metrics(train + evals)
    lines = {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                              for line in ax.get_lines()} for ax in figure.axes}

    def points(records, key):
        return [r["step"] for r in records], [r[key] for r in records]

    assert lines["loss"] == {"train": points(train, "loss"), "dev": points(evals, "dev_loss")}
    assert lines["learning rate"] == {"learning rate": points(train, "lr")}
    assert lines["throughput (samples/s)"] == {"samples/s": points(train, "samples_per_s")}
    assert lines["dev metrics"] == {
        "a accuracy": points(evals, "a/accuracy"), "a macro-F1": points(evals, "a/macro_f1"),
        "b accuracy": points(evals, "b/accuracy"), "b macro-F1": points(evals, "b/macro_f1"),
        "mean accuracy": points(evals, "accuracy"), "mean macro-F1": points(evals, "macro_f1")}
    # without a dev set: the dev panel says so
    figure = draw_metrics(train)
    (dev,) = [ax for ax in figure.axes if ax.get_title() == "dev metrics"]
    assert not dev.get_lines() and dev.texts[0].get_text() == "no evaluations (no dev set)"


def _is_png(path: Path, size=(800, 1200)) -> bool:
    import matplotlib.image

    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).shape[:2] == size


def test_fastcls_plot_draws_a_finished_run(reported_run, tmp_path, capsys):
    run, _ = reported_run
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'metrics.png'}"
    assert _is_png(run / "metrics.png")
    assert main(["plot", str(run), "--output", str(tmp_path / "chart.png")]) == 0
    assert _is_png(tmp_path / "chart.png")
    evals = [r for r in read_metrics(run) if r["kind"] == "eval"]
    dev = {line.get_label(): list(line.get_ydata()) for ax in draw_metrics(read_metrics(run)).axes
           for line in ax.get_lines() if ax.get_title() == "dev metrics"}
    assert dev == {"accuracy": [r["accuracy"] for r in evals], "macro-F1": [r["macro_f1"] for r in evals]}


def test_fastcls_plot_refuses_a_bad_run_folder_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "accuracy": 0.5}\n{"step": 2, "acc\n')
    (tmp_path / "stepless").mkdir()
    (tmp_path / "stepless" / "metrics.jsonl").write_text('[1, 2]\n')
    for folder, message in (("missing", "missing is not a folder"), ("empty", "empty has no metrics.jsonl"),
                            ("bad", "bad/metrics.jsonl line 2 is not valid JSON"),
                            ("stepless", "stepless/metrics.jsonl line 1 is not a metrics record")):
        assert main(["plot", str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not list(tmp_path.glob("*/metrics.png"))


def test_train_plot_writes_the_chart_at_the_end(tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dir / "encoder"), "--train", str(tiny_dir / "train.tsv"), "--output",
            str(run), "--max-steps", "3", "--batch-size", "8", "--log-every", "1", "--plot"]  # no dev set
    assert main(argv) == 0
    assert _is_png(run / "metrics.png")
    loss = [ax for ax in draw_metrics(read_metrics(run)).axes if ax.get_title() == "loss"][0]
    assert [list(line.get_xdata()) for line in loss.get_lines()] == [[1, 2, 3]]
