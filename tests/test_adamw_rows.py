"""FusedAdamW's row-sparse C++ step for embedding tables (fastcls.optim.row_sparse) against its dense step on an
identical copy: the same bits for weights, master weights, moments, step counts, gradients and the clipping norm,
over steps whose touched rows change (repeats, the padding row, a row touched once and never again, every row),
with weight decay on and off, clipping on and off, GradScaler's scale and skips, bf16 with fp32 master weights, a
state dict saved and loaded mid-run (the live rows derived again), and a whole tiny `fastcls.train` run."""
import copy

import pytest
import torch
from tiny import make_tiny_encoder, sst2_rows

import fastcls
from fastcls.ops import dispatch
from fastcls.ops.embedding import row_accumulated_embedding
from fastcls.optim import FusedAdamW
from fastcls.optim.adamw import MASTER_KEY
from fastcls.optim.row_sparse import LiveRows, nonzero_rows

pytestmark = pytest.mark.skipif(dispatch.cpp_ext is None, reason="the C++ extension is not built")

# 80,000 elements: two threads' shares of the bucket meet inside the table, and rows of 40 cut the 16-element
# vectors unevenly; a 7-element parameter before it starts the table off a vector boundary
VOCAB, WIDTH, PAD = 2000, 40, 0
ONCE = 1999  # touched at the first step only
STEP_IDS = [
    [5, 5, 5, PAD, 17, ONCE, 300, 5],
    [17, 18, PAD, PAD, 1000, 1001, 1002],
    [5, 6, 7, 1500, 1500],
    "reload",
    [7, 8, 9, 300],
    list(range(VOCAB)),  # every row live: the dense kernel's turn
    [10, 11],
]


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def make_params(dtype):
    generator = torch.Generator().manual_seed(0)
    shapes = [(7,), (VOCAB, WIDTH), (33, 5)]
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(dtype)) for shape in shapes]


def backward(params, ids, scale):
    """Gradients through the row-accumulated embedding (which tracks the touched rows), set_to_none first."""
    for p in params:
        p.grad = None
    ids = torch.tensor(ids)
    rows = row_accumulated_embedding(ids, params[1], PAD)
    weights = torch.linspace(-1.0, 2.0, rows.numel()).reshape(rows.shape)
    loss = (rows.float() * weights).sum() + params[0].float().square().sum() + params[2].float().sin().sum()
    (loss * scale).backward()


def assert_same(ours, dense, ours_params, dense_params):
    for p, q in zip(ours_params, dense_params, strict=True):
        assert torch.equal(p.view(torch.int16 if p.dtype == torch.bfloat16 else torch.int32),
                           q.view(torch.int16 if q.dtype == torch.bfloat16 else torch.int32))
        assert torch.equal(p.grad, q.grad)
        for key in ("exp_avg", "exp_avg_sq", "step", MASTER_KEY):
            if key in dense.state[q]:
                assert torch.equal(ours.state[p][key].view(torch.int32), dense.state[q][key].view(torch.int32)), key
    if dense.grad_norm is not None:
        assert torch.equal(ours.grad_norm, dense.grad_norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-master"])
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5], ids=["no-clip", "clip"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad-scale"])
def test_row_sparse_steps_equal_dense_steps_bit_for_bit(two_threads, dtype, max_grad_norm, weight_decay, scaled):
    ours_params, dense_params = make_params(dtype), make_params(dtype)

    def optimizer(params, row_sparse):
        opt = FusedAdamW(params, lr=0.05, weight_decay=weight_decay, master_weights=True,
                         max_grad_norm=max_grad_norm, backend="cpp")
        opt.row_sparse = row_sparse
        return opt

    ours, dense = optimizer(ours_params, True), optimizer(dense_params, False)
    scale = 256.0 if scaled else 1.0
    live = set()  # the rows ours must hold live: every row touched since the mask was last derived
    moved = set()  # the rows whose moments a step made nonzero: those a mask derived from the state holds
    table = ours_params[1]
    for step, ids in enumerate(STEP_IDS):
        if ids == "reload":  # a resumed run: fresh optimizers from the saved states, the live rows derived again
            ours_state, dense_state = copy.deepcopy(ours.state_dict()), copy.deepcopy(dense.state_dict())
            ours, dense = optimizer(ours_params, True), optimizer(dense_params, False)
            ours.load_state_dict(ours_state)
            dense.load_state_dict(dense_state)
            live = set(moved)  # the padding row and a skipped step's rows: zero moments, not live again until touched
            continue
        for opt in (ours, dense):
            if scaled:
                opt.grad_scale = torch.tensor(scale)
                opt.found_inf = torch.tensor(1.0 if step == 1 else 0.0)  # GradScaler skips the second step
        backward(ours_params, ids, scale)
        backward(dense_params, ids, scale)
        ours.step()
        dense.step()
        assert_same(ours, dense, ours_params, dense_params)
        live |= set(ids)
        if not (scaled and step == 1):
            moved |= set(ids) - {PAD}
        assert sorted(ours._live_rows.mask(table).nonzero().flatten().tolist()) == sorted(live)
        moments = nonzero_rows(ours.state[table]["exp_avg"]) | nonzero_rows(ours.state[table]["exp_avg_sq"])
        assert sorted(moments.nonzero().flatten().tolist()) == sorted(moved)
    assert ONCE in moved and ours.state_dict()["state"][1].keys() == dense.state_dict()["state"][1].keys()


def test_dead_rows_are_neither_read_nor_written(two_threads):
    """Moments poisoned behind the optimizer's back (no version counter moves) in a dead row stay as they are and
    leave its weight to the decay alone: the step did not read them; a live row takes the full update."""
    (table,) = params = make_params(torch.float32)[1:2]
    opt = FusedAdamW(params, lr=0.1, weight_decay=0.1, backend="cpp")
    backward_table(params, [3, 4])
    opt.step()
    before = table.detach().clone()
    opt.state[table]["exp_avg"].data[100] = float("nan")
    backward_table(params, [4])
    opt.step()
    decay = torch.tensor(1 - 0.1 * 0.1, dtype=torch.float32)
    assert torch.equal(table[100], before[100] * decay)
    assert opt.state[table]["exp_avg"][100].isnan().all() and not opt.state[table]["exp_avg"][3].isnan().any()
    assert not torch.equal(table[4], before[4] * decay)
    opt.state[table]["exp_avg"][100] = 0.0  # through torch: seen, and the mask derived again
    backward_table(params, [4])
    opt.step()
    assert sorted(opt._live_rows.mask(table).nonzero().flatten().tolist()) == [3, 4]


def test_the_norm_reads_this_steps_touched_rows_alone(two_threads):
    """The clipping norm's pass reads the rows touched this step, not every live row: a live row untouched this step,
    its gradient poisoned behind the optimizer's back, leaves the norm that of the touched rows."""
    (table,) = params = make_params(torch.float32)[1:2]
    opt = FusedAdamW(params, lr=0.1, max_grad_norm=1.0, backend="cpp")
    backward_table(params, [3, 4, 700])
    opt.step()
    backward_table(params, [4, 9])
    expected = table.grad.double().square().sum().sqrt().float()
    table.grad[3] = float("nan")  # live: its moments are nonzero
    table.grad[700, 5] = float("inf")
    opt.step()
    assert opt._live_rows.mask(table)[[3, 700]].all()
    assert torch.allclose(opt.grad_norm, expected, rtol=1e-6, atol=0)


def backward_table(params, ids):
    params[0].grad = None
    row_accumulated_embedding(torch.tensor(ids), params[0], PAD).sum().backward()


def test_a_tiny_training_ends_with_the_dense_steps_weights(tmp_path, monkeypatch):
    """fastcls.train with a tiny random BERT (the bundled 30522-token vocabulary), weight decay and clipping on:
    the same final weights with the row-sparse step as with the dense one, which it took at every step."""
    encoder = make_tiny_encoder(tmp_path / "encoder")
    rows = [{"sentence": text, "label": label} for label, text in sst2_rows(24, seed=2)]
    sparse_steps = []
    live_tables = LiveRows.live_tables

    def counted(self, params, entries, enabled, *deferral):
        tables = live_tables(self, params, entries, enabled, *deferral)
        sparse_steps.append(tables[0] is not None)
        return tables

    def run(name):
        result = fastcls.train(model=str(encoder), train=rows, dev=rows, output=str(tmp_path / name), epochs=2,
                               batch_size=8, lr=5e-3, weight_decay=0.01, max_grad_norm=0.5, precision="fp32",
                               seed=1, log_every=1)
        return {k: v.detach().clone() for k, v in result.model.state_dict().items()}

    monkeypatch.setattr(LiveRows, "live_tables", counted)
    sparse = run("sparse")
    assert sum(sparse_steps) == 6  # 24 rows in batches of 8 for 2 epochs, the table's bucket row-sparse in each
    monkeypatch.setattr(FusedAdamW, "row_sparse", False)
    dense = run("dense")
    assert sparse.keys() == dense.keys()
    for name in sparse:
        assert torch.equal(sparse[name], dense[name]), name
