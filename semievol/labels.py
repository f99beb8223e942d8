"""Human labels back into a task directory (``semievol import-labels``): each answered item
moves from the unlabeled split to the labeled one, with its answer.

Everything is checked before anything is written: an id that is in neither split, two
different answers for one item (conflict), the same item twice in the export (duplicate),
an answer outside the item's options, an item already labeled with another answer. Each
error names the export file, the item and the field, and leaves both splits as they were.

Both splits change together: the new files are written beside the old ones, the old ones
are copied to ``DIR/.backup/<time>/``, and a journal (``DIR/.import-labels.json``) names the
pending replacements until both are done, so a kill between the two renames is finished by
the next import-labels (or refused by ``load_task``, never read half-done). Rows keep every
column; each row gets its id written out (``unlabeled-<row>`` ids would shift as rows leave
the file). Items already labeled with the same answer are skipped, so a second import of the
same export changes nothing.

The data's fingerprint changes, so the next ``semievol run`` on it refuses to resume the
earlier run directory and needs a new ``--out``: a new run, with nothing reused (its
warm-up now trains on the grown labeled split). ``semievol suggest`` on the earlier run
still works and skips the items labeled since.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import annotation
from .data import find_split, load_split, normalise_answer, read_rows
from .errors import DataError
from .rundir import atomic_write_text
from .types import LETTERS

JOURNAL = ".import-labels.json"


@dataclass(frozen=True)
class Imported:
    added: list[str]
    """Ids moved to the labeled split by this import."""
    already: list[str]
    """Ids that were labeled with the same answer already (a repeated import)."""
    backup: Path | None


def import_labels(export: str | Path, data: str | Path) -> Imported:
    """Move the answered items of ``export`` into ``data``'s labeled split (see the module)."""
    data = Path(data)
    finish_pending(data)
    labels = annotation.read(export)
    if not labels:
        raise DataError("the export holds no answers (no task annotated yet?)", file=str(export))
    labeled_path, unlabeled_path = find_split(data, "labeled"), find_split(data, "unlabeled")
    labeled = {ex.id: ex for ex in load_split(labeled_path, split="labeled")}
    unlabeled = {ex.id: ex for ex in load_split(unlabeled_path, split="unlabeled",
                                                require_answer=False)}
    answers = _check(labels, labeled, unlabeled, Path(export))
    added = [i for i in answers if i in unlabeled]
    already = [i for i in answers if i not in unlabeled]
    if not added:
        return Imported([], already, None)
    lab_rows, lab_fields = _rows(labeled_path, "labeled")
    unl_rows, unl_fields = _rows(unlabeled_path, "unlabeled")
    letters = _uses_letters(lab_rows)
    moving = {i: row for i, row in unl_rows.items() if i in answers}
    for item, row in moving.items():
        ex = unlabeled[item]
        letter = answers[item]
        row["answer"] = letter if letters or ex.options is None else ex.option_of(letter)
        lab_rows[item] = row
    for item in moving:
        del unl_rows[item]
    fields = list(dict.fromkeys(["id", *lab_fields, *unl_fields, "answer"]))
    backup = _replace_both(data, {labeled_path: _render(labeled_path, lab_rows, fields),
                                  unlabeled_path: _render(unlabeled_path, unl_rows,
                                                          ["id", *[f for f in unl_fields if f != "id"]])})
    return Imported(added, already, backup)


def _check(labels, labeled: dict, unlabeled: dict, export: Path) -> dict[str, str]:
    """id -> answer letter (or free text) for each answered item; every problem raises."""
    first: dict[str, annotation.Label] = {}
    answers: dict[str, str] = {}
    for label in labels:
        ex = unlabeled.get(label.item_id) or labeled.get(label.item_id)
        if ex is None:
            raise DataError(f"{label.where}: field id: unknown item {label.item_id!r} (in "
                            "neither the labeled nor the unlabeled split)")
        answer = _normalise(label, ex)
        if label.item_id in first:
            before = first[label.item_id]
            if answers[label.item_id] != answer:
                raise DataError(f"{label.where}: field answer: conflicting answers for item "
                                f"{label.item_id!r}: {label.answer!r} here, {before.answer!r} "
                                f"at {before.where}")
            if before.source != label.source:
                raise DataError(f"{label.where}: field id: duplicate item {label.item_id!r} "
                                f"(also at {before.where})")
        first.setdefault(label.item_id, label)
        answers[label.item_id] = answer
        if label.item_id in labeled and labeled[label.item_id].answer != answer:
            raise DataError(f"{label.where}: field answer: item {label.item_id!r} is labeled "
                            f"{labeled[label.item_id].answer!r} already; the export says "
                            f"{label.answer!r}")
    return answers


def _normalise(label, ex) -> str:
    def fail(field: str, message: str) -> DataError:
        return DataError(f"{label.where}: field {field}: {message} (item {label.item_id!r})")

    answer = normalise_answer(label.answer, ex.options, fail)
    if answer is None:
        raise fail("answer", "is empty")
    return answer


def _rows(path: Path, split: str) -> tuple[dict[str, dict], list[str]]:
    """The split's rows as read (every column kept), by id (default ids as load_split
    makes them), and its columns in order."""
    records = read_rows(path)
    fields = list(dict.fromkeys(k for r in records for k in r))
    rows = {}
    for index, record in enumerate(records):
        raw = record.get("id")
        item = str(raw).strip() if raw is not None and str(raw).strip() else f"{split}-{index}"
        rows[item] = {**record, "id": item}
    return rows, fields


def _uses_letters(rows: dict[str, dict]) -> bool:
    """Whether the labeled split writes multi-choice answers as letters (else as text)."""
    for row in rows.values():
        answer = str(row.get("answer", "")).strip()
        if row.get("options") not in (None, "", "[]"):
            return len(answer) == 1 and answer.upper() in LETTERS
    return True


def _render(path: Path, rows: dict[str, dict], fields: list[str]) -> str:
    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for row in rows.values():
            w.writerow({k: _cell(row.get(k, "")) for k in fields})
        return buf.getvalue()
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows.values())


def _cell(value) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def _replace_both(data: Path, new: dict[Path, str]) -> Path:
    """Back up the old files, stage the new ones, then replace both under a journal."""
    backup = data / ".backup" / time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    n = 0
    while backup.exists():
        n += 1
        backup = backup.with_name(f"{backup.name.split('-')[0]}-{n}")
    backup.mkdir(parents=True)
    staged = {}
    for path, text in new.items():
        shutil.copy2(path, backup / path.name)
        tmp = path.with_name(f".{path.name}.import")
        atomic_write_text(tmp, text)
        staged[str(tmp)] = str(path)
    atomic_write_text(data / JOURNAL, json.dumps({"replace": staged, "backup": str(backup)}))
    finish_pending(data)
    return backup


def finish_pending(data: Path) -> None:
    """Finish an import a kill interrupted between its renames (its journal says which)."""
    journal = Path(data) / JOURNAL
    if not journal.exists():
        return
    for tmp, path in json.loads(journal.read_text())["replace"].items():
        if Path(tmp).exists():
            os.replace(tmp, path)
    journal.unlink()
