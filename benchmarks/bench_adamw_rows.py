"""FusedAdamW's row-sparse C++ step (fastcls.optim.row_sparse), and that step deferring the rows a batch did not touch
(fastcls.optim.deferred_rows), against its dense step on the CPU, over MiniLM's
parameter set (22.7M fp32, two groups as bench_adamw.py, clipping to MAX_GRAD_NORM as the training loop does)
with the word-embedding table's rows live that one epoch of the bundled SST-2 rows (4,000, the bundled tokenizer)
touches, and with 10 to 100% of its 30522 rows live at random.

    python benchmarks/bench_adamw_rows.py [--fractions 0.1,0.25,0.5,1] [--forced 0.35,0.5] [--steps N]
                                          [--repeats N] [--json F]

Per set of live rows: the three optimizers step identical copies of the parameters; a first, untimed step touches
every live row (through `fastcls.ops.embedding.row_accumulated_embedding`, which tracks them), then every timed
step touches a batch's ids among them (32 SST-2 rows' tokens, or BATCH_IDS random live rows): the lookup that
reads them (where the deferred step brings them up to date) and the step are timed together. All three end with
the same bits (checked, once the deferred rows are brought up to date: `sync ms`, which a run pays at each
evaluation and save). `forced` rows run the row-sparse kernel above DENSE_FRACTION too (the dense kernel takes
over there by default): what picks that threshold. Times are medians over --repeats rounds, each timing --steps
steps of each optimizer in turn; a speedup is the median of the rounds' ratios (dense / the other).
"""
import argparse
import json
import statistics
import sys
import time

import torch
from bench_adamw import MAX_GRAD_NORM, groups, make_parameters, parameter_shapes

from fastcls.config import BUNDLED_TRAIN, bundled_model_path
from fastcls.models.loading import load_tokenizer
from fastcls.ops.embedding import row_accumulated_embedding
from fastcls.optim import FusedAdamW, row_sparse

BATCH_IDS = 32 * 12  # a batch of 32 SST-2 rows holds about this many distinct tokens
VOCAB = 30522


def touch(table: torch.Tensor, ids: torch.Tensor) -> None:
    """A fresh gradient on `ids`' rows of the table, the touched rows tracked, as a training step's backward."""
    table.grad = None
    row_accumulated_embedding(ids, table).sum().backward()


def bench_live_rows(label: str, live: torch.Tensor, batches: list[torch.Tensor], forced: bool, args) -> dict:
    """Dense against row-sparse and deferred steps once `live` rows are live, each timed step touching one of
    `batches`."""
    shapes = parameter_shapes("minilm")
    contenders = {}
    for contender in ("dense", "row_sparse", "deferred"):
        params = make_parameters(shapes, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
        optimizer = FusedAdamW(groups(params), lr=1e-4, max_grad_norm=MAX_GRAD_NORM,
                               defer_untouched_rows=contender == "deferred")
        optimizer.row_sparse = contender != "dense"
        contenders[contender] = (params, optimizer)
    table = contenders["dense"][0][0]
    assert table.shape == (VOCAB, 384)
    saved_threshold = row_sparse.DENSE_FRACTION
    row_sparse.DENSE_FRACTION = 1.0 if forced else saved_threshold
    try:
        for params, optimizer in contenders.values():
            touch(params[0], live)
            optimizer.step()
        times = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, (params, optimizer) in contenders.items():
                start = time.perf_counter()
                for ids in batches:
                    touch(params[0], ids)
                    optimizer.step()
                times[name].append((time.perf_counter() - start) / len(batches))
    finally:
        row_sparse.DENSE_FRACTION = saved_threshold
    start = time.perf_counter()
    contenders["deferred"][1].sync_deferred_rows()
    sync_ms = (time.perf_counter() - start) * 1e3
    dense_params = contenders["dense"][0]
    for name in ("row_sparse", "deferred"):
        assert all(torch.equal(p, q) for p, q in zip(dense_params, contenders[name][0])), f"{name} differs"
    row = {"live": label, "live_fraction": len(live) / len(table), "forced": forced, "sync_ms": sync_ms}
    for name in contenders:
        row[f"{name}_ms"] = statistics.median(times[name]) * 1e3
    for name in ("row_sparse", "deferred"):
        row[f"{name}_speedup"] = statistics.median([d / t for d, t in zip(times["dense"], times[name])])
    return row


def random_rows(fraction: float, steps: int, generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`fraction` of the rows drawn at random, and `steps` batches of BATCH_IDS of them."""
    live = torch.randperm(VOCAB, generator=generator)[:max(1, round(fraction * VOCAB))]
    return live, [live[torch.randint(len(live), (BATCH_IDS,), generator=generator)] for _ in range(steps)]


def sst2_rows(steps: int, generator) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """The rows one epoch over the bundled SST-2 rows touches (every token id of every tokenized row), `steps`
    batches of 32 of its rows' ids, and the count."""
    tokenizer = load_tokenizer(bundled_model_path())
    with open(BUNDLED_TRAIN) as f:
        sentences = [line.rstrip("\n").split("\t", 1)[1] for line in list(f)[1:]]
    rows = [torch.tensor(ids) for ids in tokenizer(sentences)["input_ids"]]
    live = torch.cat(rows).unique()
    batches = [torch.cat([rows[i] for i in torch.randint(len(rows), (32,), generator=generator)])
               for _ in range(steps)]
    counts = {"rows": len(sentences), "live_rows": len(live), "vocab": tokenizer.vocab_size,
              "live_fraction": len(live) / tokenizer.vocab_size}
    return live, batches, counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fractions", default="0.1,0.25,0.5,1")
    parser.add_argument("--forced", default="0.25,0.35,0.5,1", help="fractions timed with the row-sparse kernel forced")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    results = {"threads": torch.get_num_threads(), "dense_fraction": row_sparse.DENSE_FRACTION, "steps": []}
    live, batches, results["sst2"] = sst2_rows(args.steps, generator)
    print(f"SST-2: {results['sst2']['live_rows']} of {results['sst2']['vocab']} rows live after one epoch of "
          f"{results['sst2']['rows']} rows ({results['sst2']['live_fraction']:.1%})")
    runs = [("SST-2 epoch", live, batches, False)]
    for fractions, forced in ((args.fractions, False), (args.forced, True)):
        runs += [(f"random {f}", *random_rows(float(f), args.steps, generator), forced)
                 for f in fractions.split(",") if f]
    for name, live, batches, forced in runs:
        row = bench_live_rows(name, live, batches, forced, args)
        results["steps"].append(row)
        print(f"{name:<12} live {row['live_fraction']:>5.1%}{' forced' if forced else '       '}  dense "
              f"{row['dense_ms']:6.2f} ms  row-sparse {row['row_sparse_ms']:6.2f} ms "
              f"({row['row_sparse_speedup']:.2f}x)  deferred {row['deferred_ms']:6.2f} ms "
              f"({row['deferred_speedup']:.2f}x, sync {row['sync_ms']:.1f} ms)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
