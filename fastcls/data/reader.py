"""Read text classification examples from TSV, CSV and JSON-lines files (long because one row loop serves
every format, rows in memory and multi-task label columns alike, and splitting it would split that loop).

Formats, chosen by the file extension:

- ``.tsv``: tab-separated, header row, no quoting: SST-2 and other GLUE text holds bare quote characters
  that a quoting reader would treat as field delimiters.
- ``.csv``: comma-separated, header row, standard quoting; a quoted field may span lines (errors then
  name the line the record starts on).
- ``.jsonl`` / ``.json``: one JSON object per line (JSON lines); blank lines are skipped.

Columns:

- ``text_columns``: the text column, or a list of columns that are concatenated, in order and with a
  space between them, into ONE text (AG News: ``["title", "description"]``).
- ``text_pair_column``: a second text for pair tasks (NLI, paraphrase); the example then holds
  ``texts=(text, pair)``, which the tokenizer encodes as a pair with its separator between them.
- ``label_column``: labels are kept as strings with surrounding whitespace removed; ``LabelMap`` turns them
  into ids. ``None`` means the file has no labels.
- ``require_labels=False`` reads prediction files: the label is ``None`` where the label column is absent
  or its cell is empty.
- ``read_multitask_examples`` reads several label columns in one pass (one per task): a row may lack a label
  for some of them, then ``None``; a row with none of them is a bad row.

With ``text_columns=None`` the text column is inferred, in this order:

1. the one column named ``text``, ``sentence``, ``content`` or ``review``;
2. ``title`` and ``description`` together (AG News);
3. the only column left besides the label (and pair) column.

Anything else is ambiguous and raises ``DataError`` listing the columns found.

A bad row (malformed, empty text, no label) is an error naming its line, unless a ``SkippedRows`` is passed
(``--skip-bad-rows``): the row is then dropped and counted there per reason.
"""
import csv
import json
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcls.data.errors import DataError, at

KNOWN_TEXT_COLUMNS = ("text", "sentence", "content", "review")
TITLE_AND_DESCRIPTION = ("title", "description")
SUPPORTED_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")


class BadRow(DataError):
    """A row that --skip-bad-rows drops: `reason` is what it is counted under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class SkippedRows:
    """The rows that reading dropped (--skip-bad-rows): per reason, the lines (or rows in memory) in file order."""

    source: str = ""
    lines: dict[str, list[int]] = field(default_factory=dict)

    SHOWN = 5  # lines named per reason

    def add(self, reason: str, line: int) -> None:
        self.lines.setdefault(reason, []).append(line)

    @property
    def counts(self) -> dict[str, int]:
        return {reason: len(lines) for reason, lines in self.lines.items()}

    def summary(self) -> str:
        """One line: `data.tsv: skipped 3 rows: 2 empty text (lines 5, 9), 1 malformed (line 12)`."""
        unit = "row" if self.source.startswith("<") else "line"
        parts = []
        for reason, lines in self.lines.items():
            shown = ", ".join(map(str, lines[:self.SHOWN])) + (", ..." if len(lines) > self.SHOWN else "")
            parts.append(f"{len(lines)} {reason} ({unit}{'s' if len(lines) > 1 else ''} {shown})")
        total = sum(self.counts.values())
        return f"{self.source}: skipped {total} row{'s' if total != 1 else ''}: {', '.join(parts)}"


@dataclass(frozen=True, slots=True)
class Example:
    texts: tuple[str, ...]  # one text, or (text, pair)
    label: str | None
    line: int  # 1-based line the record starts on, for error messages
    source: str = ""  # the file it came from, so later errors (an unseen label) can name it

    @property
    def where(self) -> str:
        return at(self.source, self.line)


def read_examples(
    data: str | Path | Any,
    *,
    text_columns: str | Sequence[str] | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = "label",
    require_labels: bool = True,
    name: str = "data",
    skipped: SkippedRows | None = None,
) -> list[Example]:
    """Read every example of a .tsv, .csv or .jsonl file, or of rows in memory (a list of dicts, a dict of
    columns, a pandas DataFrame or a datasets.Dataset; errors then name the row as `<name> row N`, 0-based); see
    the module docstring for the column rules. `skipped`: drop bad rows and count them there instead of raising."""
    label_columns = [] if label_column is None else [label_column]
    wants_label = require_labels and label_column is not None

    def example(where: str, line: int, texts: tuple[str, ...], labels: tuple[str | None, ...], source: str):
        if wants_label and labels[0] is None:
            raise BadRow(f"{where}: missing label in column {label_column!r}", "missing label")
        return Example(texts, labels[0] if labels else None, line, source)

    required = label_columns if wants_label else []
    return _read_rows(data, text_columns, text_pair_column, label_columns, required, required, name, skipped, example)


@dataclass(frozen=True, slots=True)
class MultiTaskExample:
    """A row with one label per label column (one per task): None where the row has no label for that task."""

    texts: tuple[str, ...]
    labels: tuple[str | None, ...]
    line: int
    source: str = ""

    @property
    def where(self) -> str:
        return at(self.source, self.line)


def read_multitask_examples(
    data: str | Path | Any,
    *,
    label_columns: Sequence[str],
    text_columns: str | Sequence[str] | None = None,
    text_pair_column: str | None = None,
    name: str = "data",
    skipped: SkippedRows | None = None,
) -> list[MultiTaskExample]:
    """Read every row of a file (or rows in memory, as `read_examples`) with the labels of several columns in one
    pass. A row may lack a label for some columns (an empty cell; a missing key or null in JSON lines); a row with
    no label in any of them is a bad row. A table must have every label column in its header."""
    label_columns = list(label_columns)

    def example(where: str, line: int, texts: tuple[str, ...], labels: tuple[str | None, ...], source: str):
        if all(label is None for label in labels):
            raise BadRow(f"{where}: no label in any of the columns {', '.join(map(repr, label_columns))}",
                         "missing label")
        return MultiTaskExample(texts, labels, line, source)

    return _read_rows(data, text_columns, text_pair_column, label_columns, label_columns, [], name, skipped, example)


def read_table(
    path: str | Path,
    *,
    text_columns: str | Sequence[str] | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = "label",
) -> tuple[str, list[str], list[tuple[int, dict[str, Any]]], list[str]]:
    """A file as it is, for tools that rewrite it (`fastcls augment`): (source, columns, [(line, record)] with every
    column's value as the file holds it, the text columns `read_examples` would read, the pair column last)."""
    columns, records, source, _ = _read_file(Path(path), None)
    texts = _resolve_text_columns(source, columns, text_columns, text_pair_column,
                                  [] if label_column is None else [label_column])
    return source, columns, records, [*texts, *([text_pair_column] if text_pair_column else [])]


def _read_rows(data, text_columns, text_pair_column, label_columns: list[str], header_labels: list[str],
               record_labels: list[str], name: str, skipped: SkippedRows | None, make: Callable) -> list:
    """`make(where, line, texts, labels, source)` for every row, `labels` holding one label per label column
    (None where absent or empty); a BadRow raised on the way drops the row when `skipped` is given. A table's
    header must hold the `header_labels` columns, each JSON record the `record_labels` keys."""
    if isinstance(data, str | Path):
        columns, records, source, from_table = _read_file(Path(data), skipped)
    else:
        source, from_table = f"<{name}>", False
        columns, records = _in_memory_records(data, source)
    if skipped is not None:
        skipped.source = source
        if not records:
            raise DataError(f"{source}: no rows left: {skipped.summary()}")

    texts_from = _resolve_text_columns(source, columns, text_columns, text_pair_column, label_columns)
    wanted = [*texts_from, *([text_pair_column] if text_pair_column else [])]
    if from_table:
        # a JSON record may lack a key that the first record had, so those are checked record by record
        _check_columns(at(source, 1), columns, wanted + header_labels, "column")

    examples = []
    for line, record in records:
        where = at(source, line)
        try:
            if not from_table:
                _check_columns(where, list(record), wanted + record_labels, "key")
            texts = (_joined_text(where, record, texts_from),)
            if text_pair_column:
                texts += (_joined_text(where, record, [text_pair_column]),)
            labels = tuple(_label(where, record.get(column)) for column in label_columns)
            examples.append(make(where, line, texts, labels, source))
        except BadRow as bad:
            if skipped is None:
                raise
            skipped.add(bad.reason, line)
    if not examples:
        raise DataError(f"{source}: no rows left: {skipped.summary()}")
    return examples


def _read_file(path: Path, skipped: SkippedRows | None):
    source = str(path)
    if not path.is_file():
        raise DataError(f"{source}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{source}: unsupported file type {suffix or '(none)'!r}; use one of {SUPPORTED_EXTENSIONS}")
    try:
        if suffix in (".jsonl", ".json"):
            columns, records = _read_jsonl(path, skipped)
        else:
            columns, records = _read_table(path, suffix, skipped)
    except UnicodeDecodeError:
        line, offset, byte = _first_non_utf8(path)
        raise DataError(f"{at(source, line)}: not UTF-8 text: byte 0x{byte:02x} at byte offset {offset} of the "
                        "file; save it as UTF-8") from None
    return columns, records, source, suffix in (".tsv", ".csv")


def _first_non_utf8(path: Path) -> tuple[int, int, int]:
    """(line, byte offset in the file, byte value) of the first byte that is not UTF-8. Line by line: a newline
    byte never occurs inside a UTF-8 sequence, so each line decodes on its own."""
    offset = 0
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return line, offset + e.start, raw[e.start]
            offset += len(raw)
    raise AssertionError(f"{path}: a decode error, but every line is UTF-8")


def _in_memory_records(data: Any, source: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """(columns, [(row index, record)]) of a list of dicts, a dict of columns, a DataFrame or a Dataset."""
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas DataFrame
        rows = data.to_dict("records")
    elif hasattr(data, "column_names") and hasattr(data, "to_list"):  # datasets.Dataset
        rows = data.to_list()
    elif isinstance(data, Mapping):  # columns: {"text": [...], "label": [...]}
        lengths = {len(values) for values in data.values()}
        if len(lengths) > 1:
            raise DataError(f"{source}: columns of different lengths {sorted(lengths)}")
        rows = [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    elif isinstance(data, Sequence) and not isinstance(data, str | bytes):
        rows = list(data)
    else:
        raise DataError(f"{source}: expected a file path, a list of dicts, a dict of columns, a pandas DataFrame "
                        f"or a datasets.Dataset, got {type(data).__name__}")
    if not rows:
        raise DataError(f"{source}: no rows")
    records = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{at(source, i)}: expected a dict of columns, got {type(row).__name__}")
        records.append((i, {key: _missing_as_none(value) for key, value in row.items()}))
    return list(records[0][1]), records


def _missing_as_none(value: Any) -> Any:
    # pandas writes a missing cell as NaN
    return None if isinstance(value, float) and math.isnan(value) else value


MAX_FIELD_CHARS = 2**31 - 1  # the largest limit csv takes on every platform (a C long)


def _read_table(path: Path, suffix: str, skipped: SkippedRows | None):
    source = str(path)
    if suffix == ".tsv":
        options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    else:
        options = {"strict": True}  # strict turns an unclosed quote into an error instead of a giant field
    # a field past csv's default limit (128 KB) is ordinary long text, truncated at --max-length anyway; strict
    # parsing still ends an unclosed quote with an error at the end of the file
    previous_limit = csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        return _read_records(path, source, options, skipped)
    finally:
        csv.field_size_limit(previous_limit)


def _read_records(path: Path, source: str, options: dict, skipped: SkippedRows | None):
    records = []
    # utf-8-sig drops the byte-order mark spreadsheet exports put in front of the first column name
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, **options)
        header = None
        end_of_previous = 0
        while True:
            start = end_of_previous + 1
            try:
                row = next(reader, None)
            except csv.Error as e:
                if skipped is None or header is None:
                    raise DataError(f"{at(source, start)}: malformed CSV record starting on this line: {e}") from None
                skipped.add("malformed", start)
                end_of_previous = reader.line_num
                continue
            end_of_previous = reader.line_num
            if row is None:
                break
            if not row:
                continue  # a blank line
            if header is None:
                header = row
                _check_unique(at(source, start), header)
                continue
            if len(row) != len(header):
                if skipped is not None:
                    skipped.add("malformed", start)
                    continue
                raise DataError(
                    f"{at(source, start)}: expected {len(header)} fields ({', '.join(header)}), got {len(row)}"
                )
            records.append((start, dict(zip(header, row, strict=True))))
    if header is None:
        raise DataError(f"{source}: empty file (no header row)")
    if not records and not (skipped and skipped.lines):
        raise DataError(f"{source}: no rows after the header")
    return header, records


def _read_jsonl(path: Path, skipped: SkippedRows | None) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    source = str(path)
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise DataError(f"{at(source, line)}: expected a JSON object, got {type(record).__name__}")
            except json.JSONDecodeError as e:
                if skipped is None:
                    raise DataError(f"{at(source, line)}: invalid JSON: {e.msg} (column {e.colno})") from None
                skipped.add("malformed", line)
                continue
            except DataError:
                if skipped is None:
                    raise
                skipped.add("malformed", line)
                continue
            records.append((line, record))
    if not records and not (skipped and skipped.lines):
        raise DataError(f"{source}: empty file (no JSON records)")
    return list(records[0][1]) if records else [], records


def _check_unique(where: str, header: list[str]) -> None:
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{where}: duplicate column names: {', '.join(duplicates)}")


def _check_columns(where: str, columns: list[str], wanted: list[str], kind: str) -> None:
    for name in wanted:
        if name not in columns:
            raise BadRow(f"{where}: no {kind} {name!r} ({kind}s found: {', '.join(columns)})", "malformed")


def _resolve_text_columns(
    source: str,
    columns: list[str],
    text_columns: str | Sequence[str] | None,
    text_pair_column: str | None,
    label_columns: list[str],
) -> list[str]:
    if isinstance(text_columns, str):
        return [text_columns]
    if text_columns is not None:
        if not text_columns:
            raise DataError("--text-column must name at least one column")
        return list(text_columns)
    known = [name for name in KNOWN_TEXT_COLUMNS if name in columns]
    if len(known) == 1:
        return known
    if not known and all(name in columns for name in TITLE_AND_DESCRIPTION):
        return list(TITLE_AND_DESCRIPTION)
    others = [name for name in columns if name not in (*label_columns, text_pair_column)]
    if not known and len(others) == 1:
        return others
    raise DataError(
        f"{at(source, 1)}: cannot tell which column holds the text (columns found: {', '.join(columns)}); "
        "name it with --text-column"
    )


def _joined_text(where: str, record: dict[str, Any], names: list[str]) -> str:
    parts = []
    for name in names:
        value = record[name]
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRow(f"{where}: expected text in {name!r}, got {type(value).__name__} {value!r}", "malformed")
        if value.strip():
            parts.append(value.strip())
    if not parts:
        raise BadRow(f"{where}: empty text in {' + '.join(repr(name) for name in names)}", "empty text")
    return " ".join(parts)


def _label(where: str, value: Any) -> str | None:
    """The label as a string; JSON numbers keep their integer spelling so 1 and "1" are the same class."""
    if value is None:
        return None
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):  # numpy integers too (a DataFrame's label column)
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, str):
        return value.strip() or None
    raise BadRow(f"{where}: a label must be a string or a number, got {type(value).__name__} {value!r}",
                 "malformed")
