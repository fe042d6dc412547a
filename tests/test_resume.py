"""Exact resume: a run stopped (by a callback, SIGINT/SIGTERM or kill -9) and resumed from its newest resumable
checkpoint ends with bitwise the weights of the uninterrupted run, on the CPU (deterministic by default there)."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import encoded_rows, sst2_rows, tiny_run_inputs, write_tsv

import fastcls
from fastcls.cli import main
from fastcls.components.checkpoint import TEMP_NAME
from fastcls.components.prefix_cache import PrefixCache
from fastcls.components.resume import CHECKPOINTS, checkpoints, find_run
from fastcls.errors import ConfigError

# the parts of a metrics record that depend on the clock (and the process's memory)
TIMING = ("samples_per_s", "tokens_per_s", "memory_mb", "elapsed_s")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny BERT (hidden dropout 0.1: masks matter) and 40 SST-2 rows: 5 batches of 8 per epoch."""
    tmp = tiny_run_inputs(tmp_path_factory.mktemp("resume"), 40, seed=7)
    # a second task for the multi-task case: a three-way label from the sentence's length
    write_tsv(tmp / "train_b.tsv", [[str(min(2, len(s.split()) // 6)), s] for _, s in sst2_rows(14, seed=8)])
    return tmp


def settings(tmp: Path, **overrides) -> dict:
    return {**dict(model=str(tmp / "encoder"), train=str(tmp / "train.tsv"), dev=str(tmp / "train.tsv"), batch_size=8,
                   lr=2e-3, seed=5, log_every=1), **overrides}


def digest(run: Path) -> dict:
    """sha256 of every weight the run kept: the tensors of model.safetensors and fastcls_head.safetensors (their
    files carry a fresh random checkpoint tag), and the newest resumable checkpoint's weights file, as it is."""
    out = {}
    for name in ("model.safetensors", "fastcls_head.safetensors"):
        for key, tensor in sorted(load_file(run / name).items()):
            out[f"{name}:{key}"] = hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    newest = checkpoints(run)[-1]
    out[f"checkpoint {newest.name}"] = hashlib.sha256((newest / "weights.safetensors").read_bytes()).hexdigest()
    return out


def metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


class StopAt(fastcls.Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            state.should_stop = True


CASES = {
    # 5 micro-batches an epoch; eval every 3 steps, so evaluations and early-stopping state cross the stop
    "mid-epoch": dict(epochs=2, save_every=3, eval_every=3, stop=7),
    # 3 steps an epoch (2 + 2 + 1 micro-batches): step 4 ends at micro-batch 2 of epoch 1
    "grad-accum": dict(epochs=3, grad_accum=2, save_every=2, stop=5),
    # interrupted in the second epoch: the resumed run's prefix cache is refilled as the first epoch filled it
    "frozen-cached": dict(epochs=3, freeze_embeddings=True, freeze_layers=1, save_every=1, stop=8),
    # mean pooling above a cached frozen layer
    "mean-pooled": dict(epochs=2, freeze_embeddings=True, freeze_layers=1, save_every=2, stop=7, pooling="mean"),
    # two tasks from two files, temperature sampling (the epoch's rows drawn per file), each task's own top layer,
    # learned loss weights
    "multi-task": dict(epochs=2, save_every=3, eval_every=3, stop=5, tasks=["a={}/train.tsv,{}/train.tsv",
                       "b={}/train_b.tsv"], task_layers=1, task_weighting="uncertainty", task_sampling="temperature"),
    # the small-data recipes: a group per depth, the top layer re-drawn (again on resume, then overwritten by the
    # checkpoint's weights), Adam without bias correction
    "recipes": dict(epochs=2, save_every=3, eval_every=3, stop=5, layer_lr_decay=0.7, reinit_layers=1,
                    bias_correction=False),
    # train records every 3 steps, evaluations every 4, resumed from step 5: the checkpoint holds step 4's loss, read
    # by the evaluation, on the host and step 5's on the device, both in the train record of step 6
    "log-interval": dict(epochs=2, save_every=5, eval_every=4, log_every=3, stop=7),
    # no dev set: the loss history is the train records alone; resumed from step 5, between two of them
    "no-dev": dict(epochs=2, save_every=5, log_every=2, stop=7, dev=None),
    # EDA copies drawn anew in epoch 1 (10 batches an epoch): the resumed run draws the same ones again
    "eda-fresh": dict(epochs=2, save_every=3, eval_every=4, stop=13, augment="eda", num_aug=1),
    # fixed EDA copies above a cached frozen layer: the refill covers the copies too
    "eda-fixed-cached": dict(epochs=2, freeze_embeddings=True, freeze_layers=1, save_every=1, stop=12, augment="eda",
                             num_aug=1, augment_copies="fixed"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_stopped_and_resumed_run_ends_with_the_uninterrupted_runs_bits(tiny_dir, tmp_path, case):
    options = dict(CASES[case])
    stop = options.pop("stop")
    if "tasks" in options:  # the tasks name their own files
        options.update(tasks=[task.format(tiny_dir, tiny_dir) for task in options["tasks"]], train=None, dev=None)
    whole = fastcls.train(output=str(tmp_path / "whole"), **settings(tiny_dir, **options))
    stopped = fastcls.train(output=str(tmp_path / "part"), callbacks=[StopAt(stop)], **settings(tiny_dir, **options))
    assert stopped.steps == stop < whole.steps
    resumed_from = checkpoints(tmp_path / "part")[-1].name
    assert resumed_from != f"step-{stop:06d}" or options["save_every"] == 1  # work after the checkpoint is redone
    resumed = fastcls.train(resume=str(tmp_path / "part"))
    assert resumed.steps == whole.steps and resumed.output == tmp_path / "part"
    assert digest(tmp_path / "part") == digest(tmp_path / "whole")
    assert metrics(tmp_path / "part") == metrics(tmp_path / "whole")
    every = options.get("log_every", 1)
    assert [r["step"] for r in metrics(tmp_path / "whole") if r["kind"] == "train"] == sorted(
        {*range(every, whole.steps + 1, every), whole.steps})
    if whole.best is not None:
        assert resumed.best == {**whole.best, "samples_per_s": resumed.best["samples_per_s"]}
    if case == "frozen-cached":
        assert resumed.frozen["cache_rows"] == whole.frozen["cache_rows"] == 40


def test_the_cache_fill_feeds_the_layers_above_the_values_the_cache_serves_later():
    """The frozen prefix's output is stored in bf16; the first epoch feeds the layers above that rounded value
    too, so a row gives the same values every epoch (and a recomputation gives what the cache would serve)."""
    from test_encoder import batch_of, classifier

    model = classifier("bert", packed=True).train()
    model.freeze(embeddings=True, layers=2)
    encoded = encoded_rows([7, 3, 5, 6, 2])
    cache = PrefixCache(encoded.offsets, 32, "cpu", 1 << 20)  # bf16
    model.body.use_prefix_cache(cache, encoded.key)
    batch = batch_of(encoded, [1, 4, 0], True)
    with torch.no_grad():
        filled = model.body._prefix(batch)
        served = model.body._prefix(batch)
        model.body.use_prefix_cache(None, None)
        computed = model.body._prefix(batch)
    assert cache.hits == 3 and filled.dtype == served.dtype == computed.dtype == torch.float32
    assert torch.equal(filled, served) and torch.equal(filled, computed.bfloat16().float())
    assert not torch.equal(computed, filled)  # the rounding is real


def test_checkpoint_layout_limit_and_leftovers(tiny_dir, tmp_path):
    run = tmp_path / "run"
    fastcls.train(output=str(run), callbacks=[StopAt(4)], **settings(tiny_dir, epochs=2, save_every=1,
                                                                      save_total_limit=2))
    assert [p.name for p in checkpoints(run)] == ["step-000003", "step-000004"]
    newest = checkpoints(run)[-1]
    assert sorted(p.name for p in newest.iterdir()) == ["metrics.jsonl", "optimizer.pt", "rank_state_0.pt",
                                                        "scaler.pt", "scheduler.pt", "trainer_state.json",
                                                        "weights.safetensors"]
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["format"] == 2 and state["step"] == 4 and state["world_size"] == 1
    # the run folder's records up to the checkpoint's step (log every step, evaluate at each epoch's end: step 5)
    assert [json.loads(line)["step"] for line in (newest / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert state["loop"]["micro"] == 4 and state["epoch"] == 0 and state["loop"]["samples"] == 32
    assert torch.load(newest / "rank_state_0.pt", weights_only=True)["loop"] == state["loop"]
    # a write killed before its commit, and a prune killed halfway: neither is a checkpoint, both are cleaned
    (run / CHECKPOINTS / ".tmp-step-000005").mkdir()
    (run / CHECKPOINTS / ".tmp-step-000005" / "weights.safetensors").write_bytes(b"half")
    (run / CHECKPOINTS / ".trash-step-000002").mkdir()
    assert find_run("latest", str(run)) == run and checkpoints(run)[-1] == newest
    fastcls.train(resume=str(run), callbacks=[StopAt(6)])
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == ["step-000005", "step-000006"]


def test_resume_refuses_what_would_change_the_run(tiny_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    base = settings(tiny_dir, epochs=1, save_every=2)
    fastcls.train(output=str(run), callbacks=[StopAt(2)], **base)
    capsys.readouterr()
    cases = [(["--batch-size", "4"], "--batch-size: a resumed run keeps its setting (8 in"),
             (["--max-steps", "9"], "--max-steps: a resumed run keeps its setting (None in"),
             (["--epochs", "2"], "--epochs: a resumed run keeps its setting (1 in"),
             (["--seed", "1"], "--seed: a resumed run keeps its setting"),
             (["--output", str(tmp_path / "elsewhere")], f"--output: a resumed run continues in its own folder {run}")]
    for flags, message in cases:
        assert main(["train", "--resume", str(run), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    original = (tiny_dir / "train.tsv").read_text()
    header, first, rest = original.split("\n", 2)
    (tiny_dir / "train.tsv").write_text(f"{header}\n{first} indeed\n{rest}")
    try:  # the same file name, other rows
        assert main(["train", "--resume", str(run)]) == 2
    finally:
        (tiny_dir / "train.tsv").write_text(original)
    assert "--train: the training rows differ from those the run in" in capsys.readouterr().err
    newest = checkpoints(run)[-1] / "optimizer.pt"
    intact = newest.read_bytes()
    newest.write_bytes(intact[:100])  # damaged after its commit (a disk fault, a hand edit)
    assert main(["train", "--resume", str(run)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # after the model's loading
    assert len(errors) == 1 and f"--resume: {newest.parent} cannot be read back" in errors[0], errors
    newest.write_bytes(intact)
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "--resume: " in capsys.readouterr().err
    with pytest.raises(ConfigError, match="pass the same rows as train= to resume"):
        rows = [{"sentence": s, "label": label} for label, s in sst2_rows(16)]
        fastcls.train(output=str(tmp_path / "mem"), callbacks=[StopAt(1)],
                      **{**base, "train": rows, "dev": None, "save_every": 1})
        fastcls.train(resume=str(tmp_path / "mem"))
    assert fastcls.train(resume=str(tmp_path / "mem"), train=rows).steps == 2  # the same rows given again
    monkeypatch.chdir(tmp_path)  # --resume latest without --output: the newest run under fastcls_runs/
    for name in ("20260101-000000", "20260102-000000"):
        (tmp_path / "fastcls_runs" / name).mkdir(parents=True)
    with pytest.raises(ConfigError, match="20260102-000000 holds no resumable checkpoint"):
        find_run("latest", None)
    # the same settings given again, and ones that change nothing computed, are accepted
    assert main(["train", "--resume", str(run), "--batch-size", "8", "--log-every", "3"]) == 0
    assert json.loads((run / "train_config.json").read_text())["log_every"] == 3


def test_in_python_a_signal_raises_training_interrupted_after_saving(tiny_dir, tmp_path):
    class Terminate(fastcls.Callback):
        def on_step_end(self, state):
            if state.step == 2:  # arrives mid-step: the step ends first
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(fastcls.TrainingInterrupted, match="stopped by SIGTERM after step 2") as stop:
        fastcls.train(output=str(tmp_path / "run"), callbacks=[Terminate()], **settings(tiny_dir, epochs=1))
    assert stop.value.checkpoint == checkpoints(tmp_path / "run")[-1] == tmp_path / "run" / CHECKPOINTS / "step-000002"
    assert stop.value.signum == signal.SIGTERM and stop.value.run_dir == tmp_path / "run"
    assert signal.getsignal(signal.SIGTERM) is handler  # the caller's handler is back


def cli_train(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(folder / "encoder"), "--train", str(folder / "train.tsv"), "--output", str(out),
            "--dev", str(folder / "train.tsv"), "--batch-size", "8", "--lr", "2e-3", "--seed", "5", "--log-every", "1",
            "--epochs", "6",
            "--grad-accum", "2", *extra]


SLOW_FSYNC = ("import sys, time; import fastcls.components.resume as r; f = r._fsync; "
              "r._fsync = lambda p: (time.sleep(0.05), f(p))[1]; from fastcls.cli import main; sys.exit(main())")


def start(args: list[str], cwd: Path, slow_writes: bool = False, stderr=subprocess.PIPE,
          stdout=None) -> subprocess.Popen:
    """`fastcls` in a fresh process, run from `cwd`."""
    code = SLOW_FSYNC if slow_writes else "import sys; from fastcls.cli import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, *args], stderr=stderr, stdout=stdout, text=True, bufsize=1,
                            cwd=cwd)


def wait_for(proc: subprocess.Popen, text: str) -> str:
    """stdout (a pipe: plain lines) up to the first chunk holding `text`."""
    seen = ""
    while text not in seen:
        chunk = proc.stdout.read(1) if proc.poll() is None else proc.stdout.read()
        if not chunk:
            raise AssertionError(f"the run ended before {text!r}: {seen[-2000:]}")
        seen += chunk
    return seen


@pytest.fixture(scope="module")
def whole_cli_run(tiny_dir):
    """The uninterrupted run of `cli_train`'s settings (18 steps), in this process."""
    out = tiny_dir / "whole-cli"
    assert main([*cli_train(tiny_dir, out), "--save-every", "18"]) == 0
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_says_where_and_exits_without_a_traceback(tiny_dir, whole_cli_run, tmp_path, signum):
    out = tmp_path / "run"
    proc = start(cli_train(tiny_dir, out), tmp_path, stdout=subprocess.PIPE)
    wait_for(proc, "step 1/18 ")  # the first step is logged
    proc.send_signal(signum)
    if signum == signal.SIGINT:
        proc.send_signal(signum)  # a second one, while the first is handled, changes nothing
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signum
    message = [line for line in err.splitlines() if "resumable checkpoint" in line]
    assert len(message) == 1 and "Traceback" not in err
    assert message[0].endswith(f"continue with: fastcls train --resume {out}")
    assert f"stopped by {signal.Signals(signum).name} after step " in message[0]
    assert str(checkpoints(out)[-1]) in message[0] and len(checkpoints(out)) == 1
    assert main(["train", "--resume", str(out), "--save-every", "18"]) == 0
    assert digest(out) == digest(whole_cli_run)
    assert metrics(out) == metrics(whole_cli_run)


def test_kill_9_at_random_moments_loses_only_the_work_since_the_last_checkpoint(tiny_dir, whole_cli_run, tmp_path):
    """SIGKILL at seeded random moments, checkpoint writes slowed so that some kills land inside one; each
    restart resumes from the newest committed checkpoint and the run ends with the uninterrupted run's bits."""
    out = tmp_path / "run"
    delays = random.Random(13)
    kills_in_a_write = 0
    args = cli_train(tiny_dir, out, "--save-every", "1")
    log = tmp_path / "stderr.txt"
    for attempt in range(3):
        with open(log, "w") as stderr:
            proc = start(args if attempt == 0 else ["train", "--resume", str(out)], tmp_path, slow_writes=True,
                         stderr=stderr)
        before = checkpoints(out)[-1].name if checkpoints(out) else None
        while not checkpoints(out) or checkpoints(out)[-1].name == before:  # it made progress
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.01)
        while attempt == 1 and not any(p.name.startswith(".tmp-") for p in (out / CHECKPOINTS).iterdir()):
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.005)  # the second kill lands inside a checkpoint write (which the slow fsyncs stretch)
        time.sleep(delays.uniform(0.0, 0.1 if attempt == 1 else 0.3))
        proc.kill()
        proc.wait()
        kills_in_a_write += any(p.name.startswith(".tmp-") for p in (out / CHECKPOINTS).iterdir())
        assert all(p.name.startswith(("step-", ".tmp-")) for p in (out / CHECKPOINTS).iterdir())
        state = json.loads((checkpoints(out)[-1] / "trainer_state.json").read_text())
        assert state["step"] == int(checkpoints(out)[-1].name[5:])
    assert kills_in_a_write >= 1
    assert main(["train", "--resume", str(out)]) == 0
    assert not [p for p in (out / CHECKPOINTS).iterdir() if p.name.startswith(".tmp-")]
    assert not [p for p in out.iterdir() if TEMP_NAME.fullmatch(p.name)]  # nor a killed best-checkpoint write's
    assert checkpoints(out)[-1].name == "step-000018"
    assert digest(out) == digest(whole_cli_run)
    assert metrics(out) == metrics(whole_cli_run)


def test_a_best_checkpoint_saved_after_the_newest_resumable_one_is_put_back(tiny_dir, tmp_path):
    """The run folder's best model written after the newest resumable checkpoint belongs to the work a resume
    redoes: the resume puts back the best files of the checkpoint's moment (hard links kept in it)."""
    run = tmp_path / "run"
    # a seed whose dev loss improves at step 2, the newest checkpoint's (the scenario this test needs)
    options = settings(tiny_dir, epochs=1, eval_every=1, metric="loss", save_every=2, seed=7)
    fastcls.train(output=str(run), callbacks=[StopAt(3)], **options)
    newest = checkpoints(run)[-1]
    assert newest.name == "step-000002" and json.loads((newest / "trainer_state.json").read_text())["best"]["step"] == 2
    assert not os.path.samefile(run / "model.safetensors", newest / "best" / "model.safetensors")  # step 3's

    class Check(fastcls.Callback):
        def on_train_begin(self, state):
            self.restored = all(os.path.samefile(run / name, newest / "best" / name)
                                for name in ("model.safetensors", "fastcls_head.safetensors"))

    check = Check()
    result = fastcls.train(resume=str(run), callbacks=[check])
    assert check.restored and result.steps == 5
    fastcls.train(output=str(tmp_path / "whole"), **options)
    assert digest(run) == digest(tmp_path / "whole")


DDP_WORKER = '''
import json, os, sys
import torch.distributed as dist
import fastcls

dist.init_process_group("gloo")  # one group for the three runs (fastcls uses a caller's group as it is)

class StopAt(fastcls.Callback):
    def on_step_end(self, state):
        if state.step == 5 and state.output.name == "part":
            state.should_stop = True

settings = json.loads(sys.argv[1])
whole, part = settings.pop("whole"), settings.pop("part")
fastcls.train(**settings, output=whole)
fastcls.train(**settings, output=part, callbacks=[StopAt()])
fastcls.train(resume=part)
dist.destroy_process_group()
# done: leave without the interpreter's teardown, where gloo's threads now and then abort a process that has
# finished its work ("terminate called without an active exception"; pytorch/pytorch#179291 describes the race)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_under_torchrun_each_rank_resumes_its_own_state(tiny_dir, tmp_path, fsdp):
    """2 gloo processes (each rank its own dropout masks, rows and prefix cache; under FSDP2 its shards of the
    weights and the optimizer state): stopped in the second epoch and resumed, the run ends with the
    uninterrupted 2-process run's bits."""
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    frozen = {} if fsdp else {"freeze_embeddings": True, "freeze_layers": 1}  # FSDP2 shards only what trains
    options = settings(tiny_dir, epochs=3, batch_size=4, grad_accum=2, save_every=2, fsdp=fsdp, **frozen)
    options = {**options, "whole": str(tmp_path / "whole")}
    options["part"] = str(tmp_path / "part")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), json.dumps(options)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    assert [p.name for p in sorted((tmp_path / "part" / CHECKPOINTS / "step-000004").iterdir())] == [
        "best", "metrics.jsonl", "optimizer.pt", "rank_state_0.pt", "rank_state_1.pt", "scaler.pt", "scheduler.pt",
        "trainer_state.json", "weights.safetensors"]
    assert digest(tmp_path / "part") == digest(tmp_path / "whole")
    assert metrics(tmp_path / "part") == metrics(tmp_path / "whole")
