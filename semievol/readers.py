"""Reading split files, one reader per format: each yields ``(line, record)`` pairs, the
line where the row starts (the CSV header is line 1; for Parquet, the row number from 1) and
the row as a dict of its columns, with nothing checked but the format itself. What the
fields must hold is :mod:`semievol.data`'s to check.

* CSV (:func:`csv_records`): strict, with a header; a blank line is skipped and a row with
  another number of values than the header is a DataError.
* JSONL (:func:`jsonl_records`): one object per non-blank line, split on ``"\\n"`` only.
* Parquet (:func:`parquet_records`): one row group at a time, through pyarrow.

Text is UTF-8, strictly (:func:`read_text`); an undecodable byte is a DataError that names
its line and the field that holds it. ``ClassLabel`` columns (from ``datasets`` features, or
the features a Parquet file written by ``datasets`` keeps in its schema) read as their class
names (:func:`class_names`, :func:`decode_labels`).
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError

_SURROGATE = re.compile("[\udc80-\udcff]")  # an undecodable byte under surrogateescape


def class_names(features) -> dict[str, list[str]]:
    """Each ``ClassLabel`` column's class names (from ``datasets`` features, or the
    features a Parquet file written by ``datasets`` keeps in its schema metadata)."""
    out = {}
    for column, feature in (features or {}).items():
        names = getattr(feature, "names", None) if not isinstance(feature, dict) else (
            feature.get("names") if feature.get("_type") == "ClassLabel" else None)
        if names:
            out[column] = list(names)
    return out


def decode_labels(record: dict, names: dict[str, list[str]]) -> dict:
    for column, classes in names.items():
        value = record.get(column)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(classes):
            record = {**record, column: classes[value]}
    return record


def parquet_records(path: Path) -> Iterator[tuple[int, dict]]:
    """A Parquet file's rows, one row group at a time (row numbers from 1); an integer
    column that ``datasets`` wrote as a ``ClassLabel`` reads as its class name."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError('reading Parquet needs pyarrow: pip install "semievol[datasets]"',
                        file=str(path)) from e
    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors, said with the file
        raise DataError(f"not a readable Parquet file: {e}", file=str(path)) from e
    meta = (reader.schema_arrow.metadata or {}).get(b"huggingface")
    features = json.loads(meta).get("info", {}).get("features", {}) if meta else {}
    names = class_names(features)
    row = 0
    for group in range(reader.num_row_groups):
        for record in reader.read_row_group(group).to_pylist():
            row += 1
            yield row, decode_labels(record, names)


def read_text(path: Path) -> str:
    """The file as text: UTF-8 (a leading BOM is skipped), strictly."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read: {e.strerror}", file=str(path)) from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        # Parse again with the bad bytes escaped, only to say which field holds them.
        line = data.count(b"\n", 0, e.start) + 1
        field = _field_with_bad_byte(path, data.decode("utf-8", "surrogateescape"))
        raise DataError(f"byte 0x{data[e.start]:02x} is not valid UTF-8", file=str(path),
                        line=line, field=field) from None


def _field_with_bad_byte(path: Path, text: str) -> str | None:
    reader = csv_records if path.suffix.lower() == ".csv" else jsonl_records
    try:
        for _, record in reader(text, str(path), ()):
            for key, value in record.items():
                if isinstance(value, str) and _SURROGATE.search(value):
                    return key
    except DataError:
        pass
    return None


def csv_records(text: str, file: str, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line where the row starts, {column: value}) for each non-blank CSV row."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    with _csv_field_limit(sys.maxsize):  # sizes are checked per field, with its name
        return list(_csv_rows(reader, file, required))


def _csv_rows(reader, file: str, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    line = 1
    try:
        header = next(reader, None)
        if header is None:
            raise DataError("the split is empty: no header and no rows", file=file, line=1)
        for name in required:
            if name not in header:
                raise DataError(f"missing column (the header has {header})", file=file,
                                line=1, field=name)
        while True:
            line = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                return
            if not row:
                continue  # a blank line
            if len(row) != len(header):
                field = header[len(row)] if len(row) < len(header) else None
                raise DataError(f"the row has {len(row)} values but the header has "
                                f"{len(header)} columns", file=file, line=line, field=field)
            yield line, dict(zip(header, row))
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", file=file, line=line) from None


def jsonl_records(text: str, file: str, required=()) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank JSONL line."""
    # Split on "\n" only: str.splitlines would also split at U+2028 inside JSON strings.
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON at column {e.colno}: {e.msg}", file=file,
                            line=line) from None
        except RecursionError:
            raise DataError("JSON nested too deeply", file=file, line=line) from None
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, found {type(record).__name__}",
                            file=file, line=line)
        yield line, record


@contextlib.contextmanager
def _csv_field_limit(limit: int):
    """The csv module's field size limit (process-wide), raised while one file is read."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)
