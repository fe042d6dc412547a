"""FusedAdamW's deferred rows (fastcls.optim.deferred_rows) against its dense step on an identical copy: after runs
of steps whose touched rows change, the rows a lookup reads and then every row, synced, hold the dense step's bits
(weights, master weights, moments, step counts, gradients, the clipping norm), with weight decay on and off,
clipping, maximize, GradScaler's scale and skips, bf16 with fp32 master weights, a state dict saved and loaded
mid-run, and a whole tiny `fastcls.train` run."""
import copy
import gc

import pytest
import torch
from test_adamw_rows import PAD, VOCAB, WIDTH, assert_same, backward, make_params, two_threads  # noqa: F401
from tiny import make_tiny_encoder, sst2_rows

import fastcls
from safetensors.torch import load_file
from fastcls.ops import dispatch
from fastcls.ops.embedding import DEFERRED_TABLE, row_accumulated_embedding
from fastcls.optim import FusedAdamW
from fastcls.optim.deferred_rows import DeferredRows

pytestmark = pytest.mark.skipif(dispatch.cpp_ext is None, reason="the C++ extension is not built")

# rows touched once and never again, rows coming back after many steps, the padding row, repeats
STEP_IDS = [
    [5, 5, 5, PAD, 17, 1999, 300, 5],
    [17, 18, PAD, PAD, 1000, 1001, 1002],
    [5, 6, 7, 1500, 1500],
    [1234],
    "lookup",
    [7, 8, 9, 300],
    "reload",
    [1000, 5],
    "sync",
    [10, 11, 17],
    [3, 1500, 1999],
]


def optimizer(params, deferred, **options):
    return FusedAdamW(params, lr=0.05, master_weights=True, backend="cpp", defer_untouched_rows=deferred, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-master"])
@pytest.mark.parametrize("options", [
    dict(weight_decay=0.01), dict(weight_decay=0.0), dict(weight_decay=0.01, max_grad_norm=0.5),
    dict(weight_decay=0.3, maximize=True), dict(weight_decay=0.01, scaled=True)],
    ids=["decay", "no-decay", "clip", "maximize", "grad-scale"])
def test_deferred_rows_reach_the_dense_steps_bits(two_threads, dtype, options):  # noqa: F811
    options = dict(options)
    scaled = options.pop("scaled", False)
    ours_params, dense_params = make_params(dtype), make_params(dtype)
    ours, dense = optimizer(ours_params, True, **options), optimizer(dense_params, False, **options)
    dense.row_sparse = False
    table, dense_table = ours_params[1], dense_params[1]
    scale, skipped = (256.0, 2) if scaled else (1.0, None)
    for number, ids in enumerate(STEP_IDS):
        if ids == "lookup":  # the rows a lookup reads are brought up to date, the others left behind
            steps = int(ours.state[table]["step"])  # a skipped step counts none
            lookup = torch.tensor([1999, 300, 1234, 1234, PAD], dtype=torch.int32)  # read as int64 all the same
            behind = ours._deferred_rows._tables[table].synced
            assert behind[1999] < steps and behind[1234] == steps
            with torch.no_grad():
                assert torch.equal(row_accumulated_embedding(lookup, table, PAD), dense_table[lookup])
            assert behind[[1999, 300, PAD]].tolist() == [steps] * 3 and behind[1500] < steps
            assert not torch.equal(table, dense_table)  # some rows are still behind
            continue
        if ids == "sync":
            ours.sync_deferred_rows()
            assert_same(ours, dense, ours_params, dense_params)
            # every row up to date: the history restarts at this step, and the steps to come stay exact
            assert ours._deferred_rows._tables[table].first == int(ours.state[table]["step"])
            continue
        if ids == "reload":  # a resumed run: the state dict holds every row up to date
            ours_state, dense_state = copy.deepcopy(ours.state_dict()), copy.deepcopy(dense.state_dict())
            assert_same(ours, dense, ours_params, dense_params)
            ours, dense = optimizer(ours_params, True, **options), optimizer(dense_params, False, **options)
            dense.row_sparse = False
            ours.load_state_dict(ours_state)
            dense.load_state_dict(dense_state)
            continue
        for opt in (ours, dense):
            if scaled:
                opt.grad_scale = torch.tensor(scale)
                opt.found_inf = torch.tensor(1.0 if number == skipped else 0.0)
        backward(ours_params, ids, scale)
        backward(dense_params, ids, scale)
        ours.step()
        dense.step()
        assert torch.equal(table.grad, dense_table.grad)
        if ours.grad_norm is not None:
            assert torch.equal(ours.grad_norm, dense.grad_norm)
    ours.sync_deferred_rows()
    assert_same(ours, dense, ours_params, dense_params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-master"])
def test_a_table_written_by_torch_keeps_the_values_written(two_threads, dtype):  # noqa: F811
    """model.load_state_dict (an in-place copy) replaces the weights after the steps the rows skipped: those steps
    still move the moments (and a master, which then adopts the written weights as the dense step's does), never
    the written weights; the deferral goes on, exact."""
    ours_params, dense_params = make_params(dtype), make_params(dtype)
    ours, dense = optimizer(ours_params, True, weight_decay=0.1), optimizer(dense_params, False, weight_decay=0.1)
    for ids in ([3, 4, 5], [4]):
        backward(ours_params, ids, 1.0)
        backward(dense_params, ids, 1.0)
        ours.step()
        dense.step()
    loaded = torch.randn(VOCAB, WIDTH).to(dtype)
    with torch.no_grad():
        ours_params[1].copy_(loaded)
        dense_params[1].copy_(loaded)
        assert torch.equal(row_accumulated_embedding(torch.tensor([3, 5]), ours_params[1]), loaded[[3, 5]])
    for ids in ([5, 6], [7]):
        backward(ours_params, ids, 1.0)
        backward(dense_params, ids, 1.0)
        ours.step()
        dense.step()
    ours.sync_deferred_rows()
    assert_same(ours, dense, ours_params, dense_params)


def test_switching_deferral_off_or_dropping_the_optimizer_leaves_every_row_up_to_date(two_threads):  # noqa: F811
    ours_params, dense_params = make_params(torch.float32), make_params(torch.float32)
    ours, dense = optimizer(ours_params, True, weight_decay=0.1), optimizer(dense_params, False, weight_decay=0.1)
    for ids in ([3, 4, 5], [4], [9]):
        backward(ours_params, ids, 1.0)
        backward(dense_params, ids, 1.0)
        ours.step()
        dense.step()
        if ids == [4]:
            ours.defer_untouched_rows = False  # the next step brings every row up to date first
    assert not hasattr(ours_params[1], DEFERRED_TABLE)
    assert_same(ours, dense, ours_params, dense_params)
    ours.defer_untouched_rows = True
    backward(ours_params, [11], 1.0)
    ours.step()
    assert hasattr(ours_params[1], DEFERRED_TABLE)
    del ours
    gc.collect()
    backward(dense_params, [11], 1.0)
    dense.step()
    assert not hasattr(ours_params[1], DEFERRED_TABLE)
    assert torch.equal(ours_params[1], dense_params[1])


def test_a_lookup_of_an_id_outside_the_table_fails_and_changes_nothing(two_threads):  # noqa: F811
    params = make_params(torch.float32)
    opt = optimizer(params, True, weight_decay=0.1)
    backward(params, [3], 1.0)
    opt.step()
    before = params[1].detach().clone()
    synced = opt._deferred_rows._tables[params[1]].synced.clone()
    with pytest.raises(IndexError, match="outside the table"):
        row_accumulated_embedding(torch.tensor([4, VOCAB]), params[1])
    assert torch.equal(params[1], before) and torch.equal(opt._deferred_rows._tables[params[1]].synced, synced)


def test_a_tiny_training_saves_shows_and_ends_with_the_dense_steps_weights(tmp_path, monkeypatch):
    """fastcls.train defers (every step), evaluates and saves along the way, and a callback reads the model
    mid-run: the weights it reads, the checkpoint it saves and those it ends with are the dense step's."""
    encoder = make_tiny_encoder(tmp_path / "encoder")
    rows = [{"sentence": text, "label": label} for label, text in sst2_rows(24, seed=2)]
    deferred_steps = []
    live_row = DeferredRows.live_row

    def counted(self, *args):
        deferred_steps.append(1)
        return live_row(self, *args)

    class Reader(fastcls.Callback):
        def on_step_end(self, state):
            if state.step == 3:
                self.seen = {k: v.detach().clone() for k, v in state.model.state_dict().items()}

    def run(name):
        reader = Reader()
        result = fastcls.train(model=str(encoder), train=rows, dev=rows, output=str(tmp_path / name), epochs=2,
                               batch_size=8, lr=5e-3, weight_decay=0.01, max_grad_norm=0.5, precision="fp32",
                               seed=1, log_every=1, eval_every=2, callbacks=[reader])
        final = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
        return final, reader.seen, load_file(result.output / "model.safetensors")

    monkeypatch.setattr(DeferredRows, "live_row", counted)
    deferred = run("deferred")
    assert len(deferred_steps) == 6
    monkeypatch.setattr(FusedAdamW, "row_sparse", False)
    dense = run("dense")
    for ours, theirs in zip(deferred, dense, strict=True):
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), name
