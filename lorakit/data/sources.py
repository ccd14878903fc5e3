"""Read SFT rows from files, `datasets` objects or lists: all or nothing, errors with exact places.

Sources: a path to .jsonl / .ndjson, .json (a list of objects, or JSON lines), .csv, .parquet,
a directory written by `datasets`' `save_to_disk`, a `datasets.Dataset` (or a `DatasetDict` with a
"train" split or a single split), or a list of dicts.

JSON and CSV are read with the standard library, not `datasets`' loaders: those go through
pyarrow/pandas type inference, which turns strings that look like dates ("2006-02-01") into
timestamps and CSV cells that look like numbers into ints, and reports malformed lines without
their line number. Here every JSON string and every CSV cell stays a string, and errors name the
file and line. Parquet and `save_to_disk` data are already typed and are read as stored.

Every row is checked against the format before anything is returned; the first bad row raises
`DataError` naming the file, the line (text files) or 1-based row (other sources), and the problem.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from lorakit.errors import ConfigError

from .errors import DataError, DataFileNotFoundError
from .formats import FORMATS, detect_format, record_problem

Source = Union[str, "os.PathLike[str]", list, Any]  # Any: a datasets.Dataset / DatasetDict


@dataclass
class Origin:
    """Where rows came from, to name a row in error messages."""

    name: str  # the file path, or "<list>" / "<Dataset>"
    unit: str = "row"  # "line" for text files
    numbers: list[int] | None = None  # the line of each row; None: rows are numbered 1..n

    def __call__(self, i: int) -> str:
        n = self.numbers[i] if self.numbers is not None else i + 1
        return f"{self.name} {self.unit} {n}"


def load_records(source: Source, format: str | None = None) -> list[dict]:
    """All rows of `source` as dicts, each checked against `format` (detected when None)."""
    return read_records(source, format)[0]


def read_rows(
    source: Source, not_a_record: Callable[[Any], str] | None = None
) -> tuple[list[dict], Origin]:
    """Rows as dicts and their origin (to name a row in later errors), in no format yet;
    `not_a_record(row)` says what is wrong with a row that is not a dict."""
    records, origin = _read(source)
    if not records:
        raise DataError(f"{origin.name}: empty, no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            why = not_a_record(r) if not_a_record else f"a {type(r).__name__}, not a record"
            raise DataError(f"{origin(i)}: {why}")
    return records, origin


def read_records(source: Source, format: str | None = None) -> tuple[list[dict], Origin, str]:
    """Rows, their origin (to name a row in later errors) and the format they were checked for."""
    if format is not None and format not in FORMATS:
        raise ConfigError(f"unknown data format {format!r}; expected one of {FORMATS}")
    records, origin = read_rows(source, lambda r: record_problem(r, format or "text"))
    if format is None:
        # The union of fields, so that a row missing a field is reported as such, at its line.
        fields: dict[str, None] = {}
        for r in records:
            fields.update(dict.fromkeys(r))
        try:
            format = detect_format(fields)
        except DataError as e:
            raise DataError(f"{origin.name}: {e}") from None
    for i, r in enumerate(records):
        problem = record_problem(r, format)
        if problem:
            raise DataError(f"{origin(i)}: {problem}")
    return records, origin, format


def _read(source: Source) -> tuple[list, Origin]:
    if isinstance(source, (list, tuple)):
        return list(source), Origin("<list>")
    if isinstance(source, (str, os.PathLike)):
        return _read_path(Path(source))
    module = type(source).__module__ or ""
    if module.startswith("datasets"):
        return _from_datasets(source, "<Dataset>")
    raise TypeError(
        f"cannot read SFT data from a {type(source).__name__}; pass a path, a "
        "datasets.Dataset or a list of dicts"
    )


def _read_path(path: Path) -> tuple[list, Origin]:
    name = str(path)
    if path.is_dir():
        if not any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            raise DataError(f"{name}: a directory, but not one written by datasets' save_to_disk")
        import datasets  # slow to import; only needed here

        try:
            data = datasets.load_from_disk(name)
        except Exception as e:  # datasets raises many kinds; all mean the same to the user
            raise DataError(f"{name}: cannot load the saved dataset: {e}") from None
        return _from_datasets(data, name)
    if not path.is_file():
        raise DataFileNotFoundError(f"{name}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in (".jsonl", ".ndjson", ".json", ".csv"):
        raise DataError(
            f"{name}: unsupported file type '{suffix}'; expected .jsonl, .json, "
            ".csv, .parquet or a save_to_disk directory"
        )
    try:
        # bytes, not read_text(): universal-newline mode would rewrite "\r" inside CSV cells;
        # -sig tolerates a byte-order mark
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".csv":
        return _parse_csv(text, name)
    if suffix == ".json" and text.lstrip().startswith("["):
        return _parse_json_array(text, name)
    return _parse_json_lines(text, name)


def _from_datasets(data: Any, name: str) -> tuple[list, Origin]:
    if isinstance(data, dict):  # a DatasetDict: train on "train", or on its only split
        splits = list(data.keys())
        if "train" in splits:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise DataError(
                f"{name}: a dataset with splits {splits} and none named 'train'; "
                "pass the split to use"
            )
        data, name = data[split], f"{name}[{split}]"
    if not hasattr(data, "to_list"):
        raise TypeError(f"cannot read SFT data from a {type(data).__name__}")
    return data.to_list(), Origin(name)


def _read_parquet(path: Path) -> tuple[list, Origin]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's ArrowInvalid / OSError for corrupt files
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    return rows, Origin(str(path))


def _parse_json_lines(text: str, name: str) -> tuple[list, Origin]:
    records, lines = [], []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which splitlines
    # would also break at.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            hint = ""
            if n == 1 and text.lstrip().startswith("{"):
                hint = " (expected one JSON object per line, or a .json list of objects)"
            raise DataError(
                f"{name} line {n}: malformed JSON: {e.msg} (column {e.colno}){hint}"
            ) from None
        lines.append(n)
    return records, Origin(name, "line", lines)


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _parse_json_array(text: str, name: str) -> tuple[list, Origin]:
    """A JSON list of objects, remembering the line each object starts on."""
    decoder = json.JSONDecoder()
    records, lines = [], []
    i = _JSON_WS.match(text).end() + 1  # past "["
    line, pos = 1, 0

    def fail(msg: str, at: int) -> DataError:
        return DataError(f"{name} line {text.count(chr(10), 0, at) + 1}: malformed JSON: {msg}")

    i = _JSON_WS.match(text, i).end()
    if text.startswith("]", i):
        i += 1
    else:
        while True:
            line += text.count("\n", pos, i)
            pos = i
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{name} line {e.lineno}: malformed JSON: {e.msg} (column {e.colno})"
                ) from None
            records.append(obj)
            lines.append(line)
            i = _JSON_WS.match(text, i).end()
            if text.startswith(",", i):
                i = _JSON_WS.match(text, i + 1).end()
            elif text.startswith("]", i):
                i += 1
                break
            else:
                raise fail("expected ',' or ']' after a list item", i)
    if text[i:].strip():
        raise fail("extra data after the list", _JSON_WS.match(text, i).end())
    return records, Origin(name, "line", lines)


def _parse_csv(text: str, name: str) -> tuple[list, Origin]:
    # newline="": keep line endings, so quoted cells with newlines survive intact.
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return [], Origin(name, "line", [])
        if len(set(header)) != len(header):
            raise DataError(f"{name} line 1: duplicate column names in the header {header}")
        records, lines = [], []
        last = reader.line_num
        for row in reader:
            start, last = last + 1, reader.line_num  # a quoted cell may span several lines
            if not row:  # blank line
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{name} line {start}: {len(row)} fields, but the header has {len(header)}"
                )
            records.append(dict(zip(header, row)))
            lines.append(start)
    except csv.Error as e:
        raise DataError(f"{name} line {reader.line_num}: malformed CSV: {e}") from None
    return records, Origin(name, "line", lines)
