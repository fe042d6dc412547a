"""torchrun with 2 gloo processes against one process training on the same global batch: the same weights, the
same losses and the same evaluation, for DDP (padded and unpadded, gradient accumulation, frozen layers with
the prefix cache, a rank left without rows, early stopping) and FSDP2."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_encoder, sst2_rows, write_tsv

import fastcls
from fastcls.components.distributed import Distributed, rank_seed

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    model = make_tiny_encoder(tmp / "tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # 65 rows: the last global batch of 8 has one row, so rank 1 runs a weight-0 filler row
    train = write_tsv(tmp / "train.tsv", sst2_rows(65))
    write_tsv(tmp / "dev.tsv", sst2_rows(27, seed=1))
    # a second task: a three-way label from the sentence's length
    write_tsv(tmp / "train_b.tsv", [[str(min(2, len(s.split()) // 6)), s] for _, s in sst2_rows(23, seed=2)])
    return tmp, {"model": str(model), "train": str(train), "dropout": 0.0, "precision": "fp32", "group_size": 2,
                 "log_every": 1, "seed": 3}


def _torchrun(settings: dict, optimizer: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(WORKER), json.dumps(settings), optimizer], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _single(settings: dict, optimizer: str):
    factory = (lambda groups: torch.optim.SGD(groups, lr=settings["lr"])) if optimizer == "sgd" else None
    return fastcls.train(**settings, optimizer=factory)


def _compare(single: Path, parallel: Path, rtol: float) -> None:
    ref, got = load_file(single / "model.safetensors"), load_file(parallel / "model.safetensors")
    assert ref.keys() == got.keys()
    for name in ref:
        scale = ref[name].abs().max().item() + 1e-6
        assert (ref[name] - got[name]).abs().max().item() <= rtol * scale, name
    head_ref, head_got = load_file(single / "fastcls_head.safetensors"), load_file(parallel / "fastcls_head.safetensors")
    assert head_ref.keys() == head_got.keys()
    for name in head_ref:
        torch.testing.assert_close(head_got[name], head_ref[name], rtol=rtol, atol=rtol)


def _metrics(run: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == kind]


CASES = {
    # unpadded (the CPU default), accumulation over 2 micro-steps, evaluation sharded across the ranks
    "unpadded_accumulation_eval": dict(grad_accum=2, epochs=2, lr=0.05, dev="dev", eval_every=3),
    # padded batches, a frozen layer below trained embeddings (the row-accumulated embedding gradient), early stop
    "padded_frozen_layer_patience": dict(unpad="off", freeze_layers=1, epochs=3, lr=0.05, dev="dev", eval_every=2,
                                         patience=1, metric="loss"),
    # frozen embeddings and layer, the frozen prefix served from each rank's cache from the second epoch on
    "frozen_prefix_cache": dict(freeze_embeddings=True, freeze_layers=1, epochs=2, lr=0.05),
    # two tasks from two files (batches mixing them, each task's mean over the global batch's labelled rows), each
    # with its own top layer, uncertainty weighting (its regulariser counted once over the ranks)
    "multi_task": dict(tasks=["a=train.tsv,dev.tsv", "b=train_b.tsv"], task_layers=1, task_weighting="uncertainty",
                       epochs=2, lr=0.05, eval_every=3),
    "multi_task_fsdp": dict(tasks=["a=train.tsv,dev.tsv", "b=train_b.tsv"], task_layers=1, fsdp=True, epochs=1,
                            lr=0.05, eval_every=4),
    # layer-wise lr decay (SGD on fastcls's groups, each at its own rate) and the top layer re-drawn alike on each rank
    "layer_lr_decay_reinit": dict(layer_lr_decay=0.5, reinit_layers=1, epochs=1, lr=0.05, dev="dev"),
    # FSDP2, evaluating the 27 dev rows in 3 batches of up to 10: rank 1 runs an extra forward to keep in step
    "fsdp": dict(fsdp=True, epochs=2, lr=0.05, grad_accum=2, dev="dev", eval_every=4, eval_batch_size=10),
}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_train_as_one_with_the_global_batch(setup, case):
    tmp, base = setup
    extra = dict(CASES[case])
    if extra.get("dev") == "dev":
        extra["dev"] = str(tmp / "dev.tsv")
    if "tasks" in extra:  # the tasks name their files instead of --train
        base = {k: v for k, v in base.items() if k != "train"}
        extra["tasks"] = [task.replace("=", f"={tmp}/").replace(",", f",{tmp}/") for task in extra["tasks"]]
    fsdp = extra.pop("fsdp", False)
    single = _single({**base, **extra, "batch_size": 8, "output": str(tmp / f"{case}-1")}, "sgd")
    done = _torchrun({**base, **extra, "batch_size": 4, "fsdp": fsdp, "output": str(tmp / f"{case}-2")}, "sgd")
    # fp32 on both sides; only the order of additions differs (per-rank sums, then the all-reduce)
    _compare(tmp / f"{case}-1", tmp / f"{case}-2", rtol=2e-5)
    state = json.loads((tmp / f"{case}-2" / "trainer_state.json").read_text())
    assert state["steps"] == single.steps
    if "patience" in extra:  # stopped early, all ranks at the same evaluation
        assert single.steps < math.ceil(65 / 8) * extra["epochs"]
    assert state["distributed"]["world_size"] == 2 and state["distributed"]["global_batch"] == 8
    assert len(state["distributed"]["padding_fraction_per_rank"]) == 2
    assert "global batch 8" in done.stderr + done.stdout
    if "dev" in extra or "tasks" in extra:  # the same evaluations: sharded logits gathered are the single process's
        ref, got = _metrics(tmp / f"{case}-1", "eval"), _metrics(tmp / f"{case}-2", "eval")
        assert [r["step"] for r in got] == [r["step"] for r in ref]
        for r, g in zip(ref, got, strict=True):
            assert g["accuracy"] == r["accuracy"] and g["macro_f1"] == r["macro_f1"]
            assert g["dev_loss"] == pytest.approx(r["dev_loss"], rel=1e-5)
            assert g["train_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
    # the loss history, every step (--log-every 1), with or without a dev set: the mean over both ranks' rows
    ref, got = _metrics(tmp / f"{case}-1", "train"), _metrics(tmp / f"{case}-2", "train")
    assert [(r["step"], r["epoch"], r["lr"]) for r in got] == [(r["step"], r["epoch"], r["lr"]) for r in ref]
    assert len(ref) == single.steps
    for r, g in zip(ref, got, strict=True):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5)
        assert g["tokens_per_s"] / g["samples_per_s"] == pytest.approx(r["tokens_per_s"] / r["samples_per_s"])


def test_default_optimizer_under_ddp_follows_the_single_process_losses(setup):
    """FusedAdamW's update is sign-like for tiny gradients, so weights are compared through the losses only."""
    tmp, base = setup
    extra = dict(epochs=1, lr=1e-3, dev=str(tmp / "dev.tsv"))
    _single({**base, **extra, "batch_size": 8, "output": str(tmp / "adam-1")}, "adamw")
    _torchrun({**base, **extra, "batch_size": 4, "output": str(tmp / "adam-2")}, "adamw")
    ref, got = _metrics(tmp / "adam-1", "eval"), _metrics(tmp / "adam-2", "eval")
    assert got[-1]["train_loss"] == pytest.approx(ref[-1]["train_loss"], rel=1e-3)
    assert got[-1]["dev_loss"] == pytest.approx(ref[-1]["dev_loss"], rel=1e-3)


def test_each_rank_draws_its_own_masks_repeatably():
    seeds = [rank_seed(1234, Distributed(rank, 2)) for rank in range(2)]
    assert seeds[0] != seeds[1]
    assert seeds == [rank_seed(1234, Distributed(rank, 2)) for rank in range(2)]
    assert rank_seed(1234, Distributed(0, 4)) not in seeds  # another world size, other masks
    assert rank_seed(1234, Distributed()) == 1234  # one process: the seed as it was


def test_share_splits_a_global_batch_by_rank_with_weights_that_sum_to_the_world():
    rows = list(range(7))
    shares = [Distributed(rank, 2).share(rows) for rank in range(2)]
    assert shares[0][0] == [0, 2, 4, 6] and shares[1][0] == [1, 3, 5]
    assert sum(weight for _, weight in shares) == pytest.approx(2.0)
    assert Distributed(1, 2).share([5]) == ([5], 0.0)  # no row left: a filler that adds nothing
    assert Distributed().share(rows) == (rows, 1.0)


def test_fsdp_needs_torchrun(setup):
    tmp, base = setup
    with pytest.raises(fastcls.ConfigError, match="--fsdp needs several processes"):
        fastcls.train(**base, fsdp=True, max_steps=1, output=str(tmp / "no-fsdp"))


def _reduce_rows_on_rank(rank: int, world: int, store: str, dense: bool, results) -> None:
    """Two steps of a row-accumulated embedding gradient on each rank, reduced as the trainer does."""
    import torch.distributed as dist

    from fastcls.components.distributed import DataParallel
    from fastcls.ops.embedding import row_accumulated_embedding, set_touched_rows

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        weight = torch.nn.Parameter(torch.randn(11, 3, generator=torch.Generator().manual_seed(0)))
        parallel = DataParallel.__new__(DataParallel)
        parallel.ddp = Distributed(rank, world)
        grads = []
        for step in range(2):  # rank r touches its own rows each step: stale rows of the other rank must go
            ids = torch.tensor([[rank + 2 * step, 7], [9 - rank, 7]])
            upstream = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(10 * step + rank))
            (row_accumulated_embedding(ids, weight) * upstream).sum().backward()
            if dense:
                set_touched_rows(weight, None)
            parallel._reduce_rows(weight)
            grads.append(weight.grad.clone())
            weight.grad = None  # the loop's zero_grad(set_to_none=True)
        results[rank] = torch.stack(grads)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dense", [False, True], ids=["rows", "whole-table"])
def test_row_accumulated_gradient_is_averaged_over_ranks(tmp_path, dense):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_reduce_rows_on_rank, args=(2, str(tmp_path / "store"), dense, results), nprocs=2)
    expected = []
    for step in range(2):
        grad = torch.zeros(11, 3, dtype=torch.float64)
        for rank in range(2):
            ids = torch.tensor([[rank + 2 * step, 7], [9 - rank, 7]])
            upstream = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(10 * step + rank))
            grad.index_add_(0, ids.reshape(-1), upstream.reshape(-1, 3).double())
        expected.append(grad / 2)
    for rank in range(2):
        assert torch.equal(results[rank], results[0])  # every rank holds the same bits
        torch.testing.assert_close(results[rank].double(), torch.stack(expected), rtol=1e-6, atol=1e-6)
