"""Load a task's splits from CSV or JSONL files, with errors that point at file:line:field.

A split file holds one question per row (CSV, header on line 1) or per line (JSONL):

    question   required, non-empty text
    options    a JSON list of >= 2 non-empty strings (a JSON string in CSV, a list or a
               JSON string in JSONL); absent, empty or ``[]`` means a free answer
    answer     multi-choice: a letter ("B", "b"), a 1-based number ("2", as ARC writes
               some labels) or the exact text of an option, all stored as the letter;
               free answer: the text, stripped. Required unless ``require_answer=False``.
    id         optional; else ``<split>-<row index>`` (0-based)

Every other column is kept, as read, in ``Example.meta``. Anything malformed raises one
:class:`~semievol.errors.DataError` naming the file, the line where the row starts (the
CSV header is line 1) and the field. Text fields may not hold a NUL character nor more than
``MAX_FIELD_CHARS`` characters; JSON may not nest deeper than Python's parser can follow.
Ids are unique within a split, and no unlabeled id may be a labeled one (the pipeline pools
labeled and pseudo-labeled examples by id).

A task directory holds ``labeled``, ``unlabeled`` and ``test`` files. The unlabeled answers,
where the file has them, are taken out at load time into ``Task.hidden`` so that only
reporting can see them (see :func:`load_task`).

Reading each file format (CSV, JSONL, Parquet) into rows is :mod:`semievol.readers`'s; this
module checks what the rows hold and makes the task.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from .errors import ConfigError, DataError
from .readers import (class_names, csv_records, decode_labels, jsonl_records, parquet_records,
                      read_text)
from .types import LETTERS, Example, Task

SPLITS = ("labeled", "unlabeled", "test")
EXTENSIONS = (".csv", ".jsonl", ".parquet")
HF_PREFIX = "hf://datasets/"

_KNOWN = ("id", "question", "options", "answer")
MAX_FIELD_CHARS = 1_000_000
"""The longest text a field may hold: about 250k tokens, past the context of the models
semievol runs, so a longer field is a broken file rather than a long question."""


def load_task(directory: str | Path, *, limits: dict[str, int | None] | None = None,
              columns: str | dict | None = None) -> Task:
    """Load ``labeled``, ``unlabeled`` and ``test`` (each ``.csv`` or ``.jsonl``) from a directory.

    Labeled and test rows must have answers. Unlabeled answers (optional) go to
    ``Task.hidden`` (id -> answer letter or text) and the unlabeled Examples carry
    ``answer=None``; a column that restates the answer on every unlabeled row (fpb's ``gt``,
    the sentiment word) is dropped from their meta too, so the algorithm cannot read it.

    ``limits`` maps a split name to N (or None for all): the first N rows of that file are
    kept, after the whole file has been validated.

    ``directory`` may also be a Hugging Face ``datasets`` folder (``save_to_disk``) or
    ``hf://datasets/NAME[:CONFIG]`` (``load_dataset``, offline from its cache), each with
    splits named ``labeled``, ``unlabeled`` and ``test``; split files may be Parquet.
    ``columns`` ("question=text,answer=label,options=choices", or a dict) names the
    columns that hold semievol's fields; an integer answer with a ``ClassLabel`` feature
    reads as its class name.
    """
    mapping = parse_columns(columns)
    limits = _check_limits(limits or {})
    if is_hf_source(directory):
        return _hf_task(str(directory), limits, mapping)
    directory = Path(directory)
    splits, lines = {}, {}
    for split in SPLITS:
        lines[split] = _read_split(find_split(directory, split), split=split,
                                   require_answer=split != "unlabeled", columns=mapping)
        splits[split] = list(lines[split])[:limits.get(split)]
    return _task(directory.resolve().name, splits, lines, str(find_split(directory, "unlabeled")))


def _task(name: str, splits: dict, lines: dict, unlabeled_file: str) -> Task:
    labeled = {ex.id for ex in lines["labeled"]}
    for ex, line in lines["unlabeled"].items():
        if ex.id in labeled:
            raise DataError(f"id {ex.id!r} is also a labeled id; ids must differ across the "
                            "labeled and unlabeled splits",
                            file=unlabeled_file, line=line, field="id")

    hidden = {ex.id: ex.answer for ex in splits["unlabeled"] if ex.answer is not None}
    leaks = _answer_columns(splits["unlabeled"])
    splits["unlabeled"] = [
        dataclasses.replace(ex, answer=None,
                            meta={k: v for k, v in ex.meta.items() if k not in leaks})
        for ex in splits["unlabeled"]
    ]
    return Task(name=name, hidden=hidden, **splits)


def is_hf_source(source: str | Path) -> bool:
    """A ``datasets`` folder (``save_to_disk``) or an ``hf://datasets/`` name."""
    return str(source).startswith(HF_PREFIX) or (Path(source) / "dataset_dict.json").is_file()


def parse_columns(columns: str | dict | None) -> dict[str, str]:
    """``"question=text,answer=label"`` -> {"text": "question", "label": "answer"}: each
    source column's semievol field."""
    if not columns:
        return {}
    pairs = columns.items() if isinstance(columns, dict) else \
        (part.split("=", 1) if "=" in part else (part, "") for part in columns.split(","))
    mapping = {}
    for field_, source in pairs:
        field_, source = field_.strip(), source.strip()
        if field_ not in _KNOWN or not source:
            raise ConfigError(f"--columns: {field_}={source} is not FIELD=COLUMN with FIELD "
                              f"one of {', '.join(_KNOWN)}")
        mapping[source] = field_
    return mapping


def _hf_task(source: str, limits: dict, mapping: dict[str, str]) -> Task:
    """A task from a ``datasets`` folder or an ``hf://datasets/NAME[:CONFIG]`` dataset,
    read row by row (a ``ClassLabel`` answer as its class name)."""
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f'{source}: reading Hugging Face datasets needs the datasets '
                          'package: pip install "semievol[datasets]"') from e
    try:
        if source.startswith(HF_PREFIX):
            name, _, config = source[len(HF_PREFIX):].partition(":")
            data = datasets.load_dataset(name, config or None)
        else:
            data = datasets.load_from_disk(source)
    except (OSError, ValueError, ConnectionError) as e:
        raise DataError(f"cannot load the dataset: {e}", file=source) from e
    splits, lines = {}, {}
    for split in SPLITS:
        if split not in data:
            raise DataError(f"no {split} split (it has {', '.join(data)})", file=source)
        part = data[split]
        names = class_names(part.features)
        records = ((row + 1, decode_labels(record, names)) for row, record in enumerate(part))
        lines[split] = _read_split(f"{source}[{split}]", split=split, records=records,
                                   require_answer=split != "unlabeled", columns=mapping)
        splits[split] = list(lines[split])[:limits.get(split)]
    name = source[len(HF_PREFIX):] if source.startswith(HF_PREFIX) else Path(source).resolve().name
    return _task(name.replace("/", "_").replace(":", "_"), splits, lines, f"{source}[unlabeled]")


def load_split(path: str | Path, *, split: str | None = None,
               require_answer: bool = True) -> list[Example]:
    """Read one split file (``.csv`` or ``.jsonl``) into Examples, in file order.

    ``split`` names the split in generated ids (default: the file name's stem). With
    ``require_answer=False`` the answer column/field may be missing or empty (answer None);
    an answer that is there is still checked and normalised.
    """
    return list(_read_split(path, split=split, require_answer=require_answer))


def fingerprint(task: Task) -> dict[str, dict]:
    """Each split's row count and the SHA-256 of its rows as loaded (ids, questions,
    options, answers, the other columns), after limits: what a run directory records so
    that a resume on data changed in place is refused. It is of the content, so the same
    data under another path (a trailing slash, a symlink, a copy) has the same fingerprint.
    The hidden unlabeled answers are left out: no stage reads them (the report's
    pseudo-label accuracy is worked out again on every run)."""
    prints = {}
    for split in SPLITS:
        rows = [[ex.id, ex.question, ex.options, ex.answer, ex.meta]
                for ex in getattr(task, split)]
        text = json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str)
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass"))  # JSON may hold "\udc80"
        prints[split] = {"rows": len(rows), "sha256": digest.hexdigest()}
    return prints


def read_rows(path: str | Path) -> list[dict]:
    """A split file's rows as written, every column kept and nothing checked but the file
    format: what ``semievol import-labels`` rewrites (after :func:`load_split` checked it)."""
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() == ".csv":
        return [record for _, record in csv_records(text, str(path), ())]
    return [record for _, record in jsonl_records(text, str(path))]


def normalise_answer(raw, options: tuple[str, ...] | None, fail) -> str | None:
    """An answer as the splits store it (see the module docstring); ``fail(field,
    message)`` makes the error raised for one that is not an option."""
    return _answer(raw, options, fail)


def _read_split(path: str | Path, *, split: str | None, require_answer: bool,
                columns: dict[str, str] | None = None, records=None) -> dict[Example, int]:
    """The examples of a split file, in file order, each with the line (row, for Parquet
    and datasets) where it starts. ``records``: (line, record) pairs read already (a
    ``datasets`` split), ``path`` then only names them in errors."""
    path = Path(path)
    required = ("question", "answer") if require_answer else ("question",)
    if records is None:
        suffix = path.suffix.lower()
        if suffix not in EXTENSIONS:
            raise DataError(f"unknown file type {path.suffix!r}; expected .csv, .jsonl or "
                            ".parquet", file=str(path))
        if suffix == ".parquet":
            records = parquet_records(path)
        elif suffix == ".csv":
            names = {field_: source for source, field_ in (columns or {}).items()}
            records = csv_records(read_text(path), str(path),
                                   tuple(names.get(f, f) for f in required))
        else:
            records = jsonl_records(read_text(path), str(path))
    if columns:
        records = ((line, {columns.get(k, k): v for k, v in record.items()})
                   for line, record in records)

    prefix = split or path.stem
    examples: dict[Example, int] = {}
    first_line: dict[str, int] = {}
    for index, (line, record) in enumerate(records):
        example = _example(record, str(path), line, f"{prefix}-{index}", required)
        if example.id in first_line:
            raise DataError(f"duplicate id {example.id!r} (first at line "
                            f"{first_line[example.id]})", file=str(path), line=line, field="id")
        first_line[example.id] = line
        examples[example] = line
    if not examples:
        raise DataError("the split is empty: no rows", file=str(path), line=1)
    return examples


# --- checking one row -----------------------------------------------------------------


def _example(record: dict, file: str, line: int, default_id: str,
             required: tuple[str, ...]) -> Example:
    def fail(field: str, message: str) -> DataError:
        return DataError(message, file=file, line=line, field=field)

    for name in required:
        if name not in record:
            raise fail(name, "missing field")
    for name, value in record.items():
        _check_text(value, lambda message, name=name: fail(str(name), message))
    question = record["question"]
    if not isinstance(question, str) or not question.strip():
        raise fail("question", f"must be non-empty text, found {question!r}")
    options = _options(record.get("options"), fail)
    answer = _answer(record.get("answer"), options, fail)
    if answer is None and "answer" in required:
        raise fail("answer", "is empty")
    raw_id = record.get("id")
    example_id = str(raw_id).strip() if raw_id is not None and str(raw_id).strip() else default_id
    meta = {k: v for k, v in record.items() if k not in _KNOWN}
    return Example(id=example_id, question=question.strip(), options=options, answer=answer,
                   meta=meta)


def _check_text(value, fail) -> None:
    """No NUL and no runaway length, in a text or in the texts of a list (options)."""
    for text in value if isinstance(value, list) else [value]:
        if not isinstance(text, str):
            continue
        if "\x00" in text:
            raise fail("contains a NUL character (\\x00)")
        if len(text) > MAX_FIELD_CHARS:
            raise fail(f"is {len(text):,} characters long; at most {MAX_FIELD_CHARS:,}")


def _options(raw, fail) -> tuple[str, ...] | None:
    """None for a free answer; else the options, each a non-empty string."""
    if isinstance(raw, str):
        if not raw.strip():
            return None
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise fail("options", f"not a JSON list: {e}") from None
        except RecursionError:
            raise fail("options", "JSON nested too deeply") from None
    if raw is None or raw == []:
        return None
    if not isinstance(raw, list):
        raise fail("options", f"must be a list of strings, found {type(raw).__name__}")
    if len(raw) < 2:
        raise fail("options", f"needs at least 2 options, found {len(raw)}")
    options = []
    for i, option in enumerate(raw):
        if isinstance(option, float) and math.isnan(option):
            # pandas wrote MMLU's option "None" as NaN (its default NA strings include
            # "None"); ten MMLU rows have it, one as the gold answer.
            option = "None"
        if not isinstance(option, str) or not option.strip():
            raise fail("options", f"option {LETTERS[i] if i < len(LETTERS) else i + 1} "
                                  f"must be non-empty text, found {option!r}")
        options.append(option)
    if len(options) > len(LETTERS):
        raise fail("options", f"at most {len(LETTERS)} options, found {len(options)}")
    return tuple(options)


def _answer(raw, options: tuple[str, ...] | None, fail) -> str | None:
    """The answer normalised: an option letter for multi-choice, else stripped text."""
    if raw is None:
        return None
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise fail("answer", f"must be text, found {raw!r}")
    text = str(raw).strip()
    if not text:
        return None
    if options is None:
        return text
    letters = LETTERS[:len(options)]
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    if text.isdigit() and 1 <= int(text) <= len(options):
        return letters[int(text) - 1]  # ARC's 1-based labels
    if text in options:
        return letters[options.index(text)]
    raise fail("answer", f"{text!r} is not an option: expected one of {', '.join(letters)}, "
                         f"1-{len(options)} or an option's exact text")


# --- task-level helpers ---------------------------------------------------------------


def find_split(directory: Path, split: str) -> Path:
    if not directory.is_dir():
        raise DataError("is not a directory", file=str(directory))
    found = [directory / f"{split}{ext}" for ext in EXTENSIONS
             if (directory / f"{split}{ext}").is_file()]
    if not found:
        raise DataError(f"no {split} split: expected {split}.csv, {split}.jsonl or "
                        f"{split}.parquet",
                        file=str(directory))
    if len(found) > 1:
        raise DataError(f"two files for the {split} split ({', '.join(p.name for p in found)}); "
                        "keep one", file=str(directory))
    return found[0]


def _check_limits(limits: dict) -> dict:
    for split, n in limits.items():
        if split not in SPLITS:
            raise ConfigError(f"limits: unknown split {split!r}; expected one of {SPLITS}")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError(f"limits: {split} must be a positive integer or None, got {n!r}")
    return limits


def _answer_columns(examples: list[Example]) -> set[str]:
    """Meta columns equal to the answer (its letter or option text) on every answered row."""
    answered = [ex for ex in examples if ex.answer is not None]
    if not answered:
        return set()

    def says_answer(ex: Example, value) -> bool:
        value = str(value).strip().lower()
        texts = {ex.answer.lower()}
        if ex.options is not None:
            texts.add(ex.option_of(ex.answer).strip().lower())
        return value in texts

    columns = set().union(*(ex.meta for ex in answered))
    return {c for c in columns
            if all(c in ex.meta and says_answer(ex, ex.meta[c]) for ex in answered)}
