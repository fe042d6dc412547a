"""`fastcls augment`: write an augmented copy of a data file. Every input row is followed by its `--num-aug` EDA
copies; every column is kept as it was except the text columns (each edited independently by the copy's
operation; a pair column too), and two columns are added: `eda_source_row`, the 0-based data row of the input it
came from, and `eda_operation` ("original", "sr", "ri", "rs" or "rd"). The output's format follows its suffix."""
import argparse
import csv
import io
import json
import time
from pathlib import Path

from fastcls.augment.config import EdaConfig
from fastcls.augment.eda import augment_rows
from fastcls.augment.synonyms import SynonymTable
from fastcls.components.output_path import check_writable, save_text_atomic
from fastcls.data.errors import DataError, at
from fastcls.data.reader import SUPPORTED_EXTENSIONS, read_table
from fastcls.errors import ConfigError

ADDED_COLUMNS = ("eda_source_row", "eda_operation")


def run(args: argparse.Namespace) -> str:
    """The command, from its parsed flags; returns its one-line report."""
    cfg = EdaConfig(alpha_sr=args.alpha_sr, alpha_ri=args.alpha_ri, alpha_rs=args.alpha_rs, p_rd=args.p_rd,
                    num_aug=args.num_aug, ops=tuple(args.eda_ops))
    return augment_file(args.input, args.output, cfg, synonyms=args.synonyms, seed=args.seed,
                        text_columns=getattr(args, "text_columns", None),
                        text_pair_column=getattr(args, "text_pair_column", None),
                        label_column=getattr(args, "label_column", "label"), overwrite=args.overwrite)


def augment_file(data: str | Path, output: str | Path, cfg: EdaConfig, *, synonyms: str | None = None, seed: int = 0,
                 text_columns=None, text_pair_column: str | None = None, label_column: str | None = "label",
                 overwrite: bool = False) -> str:
    """Write `data` (a .tsv, .csv or .jsonl file) and its augmented copies to `output`; returns the one-line
    report: rows in and out, seconds, the synonym table and its coverage of the data."""
    start = time.perf_counter()
    cfg.check()
    output = check_writable(output, folder=False)
    if output.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise ConfigError(f"--output {output}: unsupported file type {output.suffix or '(none)'!r}; use one of "
                          f"{SUPPORTED_EXTENSIONS}")
    if output.exists() and not overwrite:
        raise ConfigError(f"--output {output} exists; choose a new file, or pass --overwrite to replace it")
    table = SynonymTable.load(synonyms)
    source, columns, records, text_columns = read_table(data, text_columns=text_columns,
                                                        text_pair_column=text_pair_column, label_column=label_column)
    for name in ADDED_COLUMNS:
        if name in columns:
            raise DataError(f"{at(source, 1)}: already has a column {name!r} (an augmented file?)")
    texts = [_row_texts(source, line, record, text_columns) for line, record in records]
    augmented = augment_rows(texts, cfg, table, seed)

    rows = []
    for i, (_, record) in enumerate(records):
        rows.append({**record, ADDED_COLUMNS[0]: i, ADDED_COLUMNS[1]: "original"})
        for k in range(i * cfg.num_aug, (i + 1) * cfg.num_aug):
            copy = dict(record)
            for name, text in zip(text_columns, augmented.texts[k], strict=True):
                if record.get(name):  # an empty or missing text stays as it was
                    copy[name] = text
            rows.append({**copy, ADDED_COLUMNS[0]: i, ADDED_COLUMNS[1]: augmented.ops[k]})
    save_text_atomic(_formatted(output, [*columns, *ADDED_COLUMNS], rows), output)
    coverage = table.coverage(texts)
    return (f"{source}: {len(records):,} rows in, {len(rows):,} rows out (each followed by its {cfg.num_aug} "
            f"cop{'y' if cfg.num_aug == 1 else 'ies'}) in {time.perf_counter() - start:.1f} s; "
            f"synonyms: {table.source}, {coverage.describe()}; wrote {output}")


def _row_texts(source: str, line: int, record: dict, names: list[str]) -> tuple[str, ...]:
    texts = []
    for name in names:
        if name not in record:
            raise DataError(f"{at(source, line)}: no key {name!r} (keys found: {', '.join(record)})")
        value = record[name]
        if value is not None and not isinstance(value, str):
            raise DataError(f"{at(source, line)}: expected text in {name!r}, got {type(value).__name__} {value!r}")
        texts.append(value or "")
    return tuple(texts)


def _formatted(output: Path, columns: list[str], rows: list[dict]) -> str:
    suffix = output.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if row.get(c) is None else row[c] for c in columns] for row in rows])
        return buffer.getvalue()
    lines = ["\t".join(columns)]
    for row in rows:
        values = ["" if row.get(c) is None else str(row[c]) for c in columns]
        if any("\t" in v or "\n" in v or "\r" in v for v in values):
            raise DataError(f"{output}: data row {row[ADDED_COLUMNS[0]]} of the input holds a tab or a line break, "
                            "which .tsv cannot hold; write .csv or .jsonl")
        lines.append("\t".join(values))
    return "\n".join(lines) + "\n"

