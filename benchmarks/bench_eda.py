"""EDA's speed on real data: `augment_rows` over every SST-2 training row (67,349) and every AG News row, --num-aug
copies each (default 4, the paper's for large sets), in one process.

    python benchmarks/bench_eda.py [--num-aug 4] [--seed 0]

Prints one table: rows, copies made, seconds, input rows per second, the bundled synonym table's load time (the
first use in a process) and its coverage of the data. The time includes preparing each row (tokens, synonym
lookups) and is single-threaded.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = {"SST-2 train": DATA / "sst2" / "train.tsv", "AG News": DATA / "agnews" / "train.csv"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-aug", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    missing = [str(path) for path in SETS.values() if not path.is_file()]
    if missing:
        sys.exit(f"bench_eda: data not found: {', '.join(missing)} (expected ../shared/data/ beside the project)")

    from fastcls.augment import EdaConfig, SynonymTable, augment_rows
    from fastcls.data import read_examples

    start = time.perf_counter()
    table = SynonymTable.load()
    load_seconds = time.perf_counter() - start
    cfg = EdaConfig(num_aug=args.num_aug)
    print(f"synonyms: {table.source}; EDA defaults, {args.num_aug} copies per row, seed {args.seed}")
    print("| data | rows | copies | seconds | rows/s | table load s | coverage |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, path in SETS.items():
        texts = [example.texts for example in read_examples(str(path))]
        start = time.perf_counter()
        augmented = augment_rows(texts, cfg, table, args.seed)
        seconds = time.perf_counter() - start
        print(f"| {name} | {len(texts):,} | {len(augmented.texts):,} | {seconds:.2f} | {len(texts) / seconds:,.0f} | "
              f"{load_seconds:.2f} | {table.coverage(texts).describe()} |")


if __name__ == "__main__":
    main()
