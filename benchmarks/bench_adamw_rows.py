"""FusedAdamW's row-sparse C++ step (fastcls.optim.row_sparse) against its dense step on the CPU, over MiniLM's
parameter set (22.7M fp32, two groups as bench_adamw.py, clipping to MAX_GRAD_NORM as the training loop does)
with 10 to 100% of the word-embedding table's 30522 rows live; and how many rows one epoch of the bundled SST-2
rows (4,000, the bundled tokenizer) makes live.

    python benchmarks/bench_adamw_rows.py [--fractions 0.1,0.25,0.5,1] [--steps N] [--repeats N] [--json F]

Per live fraction f: the two optimizers step identical copies of the parameters; a first, untimed step touches
f·30522 random rows (through `fastcls.ops.embedding.row_accumulated_embedding`, which tracks them), then every
timed step touches BATCH_IDS of those rows again (a batch's tokens), so f of the rows stay live. Both steps end
with the same bits (checked). `forced` rows run the row-sparse kernel above DENSE_FRACTION too (the dense kernel
takes over there by default): what picks that threshold. Times are medians over --repeats rounds, each timing
--steps steps of each optimizer in turn; the speedup is the median of the rounds' ratios (dense / row-sparse).
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


def touch(table: torch.Tensor, ids: torch.Tensor) -> None:
    """A fresh gradient on `ids`' rows of the table, the touched rows tracked, as a training step's backward."""
    table.grad = None
    row_accumulated_embedding(ids, table).sum().backward()


def bench_fraction(fraction: float, forced: bool, args, generator) -> dict:
    shapes = parameter_shapes("minilm")
    contenders = {}
    for name in ("dense", "row_sparse"):
        params = make_parameters(shapes, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0))
        optimizer = FusedAdamW(groups(params), lr=1e-4, max_grad_norm=MAX_GRAD_NORM)
        optimizer.row_sparse = name == "row_sparse"
        contenders[name] = (params, optimizer)
    table = contenders["dense"][0][0]
    assert table.shape == (30522, 384)
    live = torch.randperm(len(table), generator=generator)[:max(1, round(fraction * len(table)))]
    batches = [live[torch.randint(len(live), (BATCH_IDS,), generator=generator)] for _ in range(args.steps)]
    saved_threshold = row_sparse.DENSE_FRACTION
    row_sparse.DENSE_FRACTION = 1.0 if forced else saved_threshold
    try:
        for params, optimizer in contenders.values():
            touch(params[0], live)
            optimizer.step()
        times = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, (params, optimizer) in contenders.items():
                elapsed = 0.0
                for ids in batches:
                    touch(params[0], ids)
                    start = time.perf_counter()
                    optimizer.step()
                    elapsed += time.perf_counter() - start
                times[name].append(elapsed / len(batches))
    finally:
        row_sparse.DENSE_FRACTION = saved_threshold
    (dense_params, _), (sparse_params, _) = contenders.values()
    assert all(torch.equal(p, q) for p, q in zip(dense_params, sparse_params)), "the two steps differ"
    ratios = [d / s for d, s in zip(times["dense"], times["row_sparse"])]
    return {"live_fraction": fraction, "forced": forced, "dense_ms": statistics.median(times["dense"]) * 1e3,
            "row_sparse_ms": statistics.median(times["row_sparse"]) * 1e3, "speedup": statistics.median(ratios)}


def sst2_live_rows() -> dict:
    """The rows one epoch over the bundled SST-2 rows touches: every token id of every tokenized row."""
    tokenizer = load_tokenizer(bundled_model_path())
    with open(BUNDLED_TRAIN) as f:
        sentences = [line.rstrip("\n").split("\t", 1)[1] for line in list(f)[1:]]
    ids = {i for row in tokenizer(sentences)["input_ids"] for i in row}
    return {"rows": len(sentences), "live_rows": len(ids), "vocab": tokenizer.vocab_size,
            "live_fraction": len(ids) / tokenizer.vocab_size}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fractions", default="0.1,0.25,0.5,0.75,1")
    parser.add_argument("--forced", default="0.5,0.75,0.9,1", help="fractions to time with the sparse kernel forced")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    results = {"threads": torch.get_num_threads(), "dense_fraction": row_sparse.DENSE_FRACTION, "steps": []}
    runs = [(float(f), False) for f in args.fractions.split(",")] + \
        [(float(f), True) for f in args.forced.split(",") if f]
    for fraction, forced in runs:
        row = bench_fraction(fraction, forced, args, generator)
        results["steps"].append(row)
        print(f"live {fraction:>5.0%}{' forced' if forced else '       '}  dense {row['dense_ms']:6.2f} ms  "
              f"row-sparse {row['row_sparse_ms']:6.2f} ms  speedup {row['speedup']:.2f}x", flush=True)
    results["sst2"] = sst2_live_rows()
    print(f"SST-2: {results['sst2']['live_rows']} of {results['sst2']['vocab']} rows live after one epoch of "
          f"{results['sst2']['rows']} rows ({results['sst2']['live_fraction']:.1%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
