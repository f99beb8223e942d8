"""semievol.data fuzzed (hypothesis): random bytes, encodings, CSV quoting, huge and deeply
nested fields. A split file either loads or raises one DataError naming the file and the
line (and the field, wherever the error is about a value); never another exception."""
from __future__ import annotations

import csv
import io
import json

from hypothesis import HealthCheck, given, settings, strategies as st

from semievol.data import MAX_FIELD_CHARS, load_split
from semievol.errors import DataError

FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
"""Over the profile conftest.py loads: 300 examples a test, derandomized."""

SYNTAX = ("invalid JSON", "malformed CSV", "nested too deeply", "expected a JSON object",
          "the split is empty", "values but the header has", "is not valid UTF-8")
"""Errors in a file's syntax, before any field is read: these name the file and the line."""

encodings = st.one_of(st.just("utf-8"),
                      st.sampled_from(["utf-8-sig", "utf-16", "latin-1", "cp1252"]))

tricky = st.sampled_from(['"', '""', "\n", "\r\n", "\r", ",", "\x00", "\ufeff", "\u2028",
                          "\\", "'", "[", "]", "{", "}", "A", "b", "2", " ", ""])
huge = st.integers(MAX_FIELD_CHARS + 1, MAX_FIELD_CHARS + 9).map(lambda n: "x" * n)
deep = st.sampled_from([10, 900, 100_000]).map(lambda n: "[" * n + "]" * n)
"""JSON nested past what Python's parser follows (about 1,000 levels here) and within it."""
texts = st.one_of(st.text(max_size=30), tricky, st.lists(tricky, max_size=8).map("".join),
                  st.lists(st.text(max_size=8), min_size=0, max_size=5).map(json.dumps),
                  huge, deep)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12)
keys = st.one_of(st.sampled_from(["id", "question", "options", "answer"]), st.text(max_size=6))


def check(tmp_path, name: str, data: bytes, require_answer: bool) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    try:
        examples = load_split(path, require_answer=require_answer)
    except DataError as e:
        message = str(e)
        assert e.file == str(path) and message.startswith(f"{path}:"), message
        lines = data.count(b"\n") + data.count(b"\r") + 1  # CSV ends a line at a lone \r too
        assert isinstance(e.line, int) and 1 <= e.line <= lines, message
        assert e.field is not None or any(s in message for s in SYNTAX), message
        return
    assert examples and all(ex.question for ex in examples)


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".csv", ".jsonl"]),
       require_answer=st.booleans())
def test_random_bytes(tmp_path_factory, data, suffix, require_answer):
    check(tmp_path_factory.mktemp("fuzz"), "split" + suffix, data, require_answer)


COLUMNS = ["id", "question", "options", "answer"]
VALID = ["q1", "Which colour is the sky?", '["red", "blue"]', "B"]
mutated = st.tuples(st.integers(0, 3), st.one_of(texts, deep, huge)).map(
    lambda change: [*VALID[:change[0]], change[1], *VALID[change[0] + 1:]])
"""A valid row with one field fuzzed: the way to reach the checks of each field."""


@st.composite
def tables(draw) -> list[list[str]]:
    """A header (often the known columns) and rows: fuzzed valid rows, or random ones
    mostly as wide as the header."""
    header = draw(st.one_of(st.just(COLUMNS), st.lists(keys, min_size=1, max_size=5)))
    width = st.one_of(st.just(len(header)), st.integers(0, 6))
    row = st.one_of(mutated, width.flatmap(lambda n: st.lists(texts, min_size=n, max_size=n)))
    return [header, *draw(st.lists(row, max_size=5))]


@FUZZ
@given(table=tables(),
       quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC, None]),
       encoding=encodings, require_answer=st.booleans())
def test_csv(tmp_path_factory, table, quoting, encoding, require_answer):
    out = io.StringIO(newline="")
    if quoting is None:  # no quoting at all: commas and quotes inside fields break rows
        out.write("\n".join(",".join(row) for row in table))
    else:
        csv.writer(out, quoting=quoting).writerows(table)
    data = out.getvalue().encode(encoding, errors="surrogatepass" if "utf" in encoding
                                 else "replace")
    check(tmp_path_factory.mktemp("fuzz"), "split.csv", data, require_answer)


@FUZZ
@given(records=st.lists(st.one_of(mutated.map(lambda row: dict(zip(COLUMNS, row))),
                                  st.dictionaries(keys, json_values, max_size=6)), max_size=5),
       nested=st.one_of(st.none(), deep), cut=st.one_of(st.none(), st.integers(0, 200)),
       encoding=encodings, require_answer=st.booleans())
def test_jsonl(tmp_path_factory, records, nested, cut, encoding, require_answer):
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if nested is not None:  # a value nested deeply as JSON itself, not as a string
        lines.append('{"question": "q", "answer": "a", "options": %s}' % nested)
    text = "\n".join(line[:cut] if cut is not None and i == len(lines) - 1 else line
                     for i, line in enumerate(lines))
    data = text.encode(encoding, errors="surrogatepass" if "utf" in encoding else "replace")
    check(tmp_path_factory.mktemp("fuzz"), "split.jsonl", data, require_answer)
