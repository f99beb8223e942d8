"""The annotation tools' formats, both ways: suggested items out (with the run's
pseudo-label as a pre-annotation) and finished labels back in.

    label-studio  tasks JSON: ``data`` (item_id, question, the options, the n candidates,
                  the reason), ``predictions`` [{model_version: the run id, score, result}];
                  with the labeling config XML the tasks fit. An export (JSON) is read
                  back from each task's ``annotations`` (cancelled ones skipped).
    argilla       records JSONL in Argilla 2's record dict form (``rg.Record.from_dict``):
                  ``id``, ``fields``, ``metadata``, ``suggestions`` {"answer": {value,
                  score, agent: the run id}}. An export (``records.to_json`` / to_list) is
                  read back from each record's ``responses`` {"answer": [{value, status}]}
                  (submitted ones).
    csv           the task's own columns (id, question, options, answer) with the answer
                  empty to fill in, plus pseudo_label, score, candidates, reason.

Reading gives ``Label(item_id, answer, where)`` rows, ``where`` naming the file and the
task, record or line, so import-labels can say which one is wrong.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from .errors import DataError
from .suggest import Candidate, answer_text

FORMATS = ("label-studio", "argilla", "csv")
FROM, TO = "answer", "question"
"""The labeling config's control (the answer) and the object it labels (the question)."""


@dataclass(frozen=True)
class Label:
    """One human answer read from an export."""

    item_id: str
    answer: str
    where: str
    """'FILE: item 3 (item 'x', annotation 0)' / 'FILE: line 7': what an error names."""
    source: str = ""
    """The task, record or line it came from ('FILE: item 3'): two labels of one item from
    two sources are a duplicate; from one source (two annotators), they must agree."""


# --- out ------------------------------------------------------------------------------


def write(chosen: list[Candidate], run_id: str, fmt: str, out: Path) -> list[Path]:
    """Write the suggestions in ``fmt`` to ``out`` (and, for Label Studio, the labeling
    config beside it as ``<out stem>.xml``); return the files written."""
    out = Path(out)
    if fmt == "label-studio":
        tasks = [_ls_task(c, run_id) for c in chosen]
        out.write_text(json.dumps(tasks, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        config = out.with_suffix(".xml")
        config.write_text(labeling_config(chosen), encoding="utf-8")
        return [out, config]
    if fmt == "argilla":
        out.write_text("".join(json.dumps(_argilla_record(c, run_id), ensure_ascii=False) + "\n"
                               for c in chosen), encoding="utf-8")
        return [out]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "question", "options", "answer", "pseudo_label", "score",
                    "candidates", "reason"])
        for c in chosen:
            ex = c.example
            w.writerow([ex.id, ex.question, json.dumps(list(ex.options)) if ex.options else "",
                        "", answer_text(c, c.pseudo_label) if c.pseudo_label else "", c.score,
                        json.dumps([answer_text(c, a) for a in c.answers]), c.reason])
        out.write_text(buf.getvalue(), encoding="utf-8")
        return [out]
    raise DataError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")


def labeling_config(chosen: list[Candidate]) -> str:
    """Label Studio's labeling config for these tasks: one choice among the options (fixed
    choices when every item has the same options, else each task's own through
    ``$choices``), or a text box for free answers."""
    options = {c.example.options for c in chosen}
    if options == {None} or not options:
        control = f'  <TextArea name="{FROM}" toName="{TO}" maxSubmissions="1" required="true"/>'
    elif len(options) == 1:
        (opts,) = options
        choices = "\n".join(f"    <Choice value={quoteattr(o)}/>" for o in opts)
        control = (f'  <Choices name="{FROM}" toName="{TO}" choice="single" required="true">\n'
                   f"{choices}\n  </Choices>")
    else:
        control = (f'  <Choices name="{FROM}" toName="{TO}" choice="single" required="true" '
                   'value="$choices"/>')
    return (f'<View>\n  <Text name="{TO}" value="$question"/>\n{control}\n'
            '  <Header value="Why this item, and what the model said"/>\n'
            '  <Text name="context" value="$context"/>\n</View>\n')


def _context(c: Candidate) -> str:
    candidates = ", ".join(answer_text(c, a) for a in c.answers)
    return f"Chosen because: {c.reason}. The model's {len(c.answers)} answers: {candidates}."


def _ls_task(c: Candidate, run_id: str) -> dict:
    ex = c.example
    data = {"item_id": ex.id, "question": ex.question, "context": _context(c),
            "candidates": [answer_text(c, a) for a in c.answers], "reason": c.reason}
    if ex.options:
        data["options"] = list(ex.options)
        data["choices"] = [{"value": o} for o in ex.options]
    task = {"data": data, "predictions": []}
    if c.pseudo_label is not None:
        value = {"choices": [answer_text(c, c.pseudo_label)]} if ex.options else {"text": [c.pseudo_label]}
        task["predictions"].append({
            "model_version": run_id, "score": c.score,
            "result": [{"from_name": FROM, "to_name": TO,
                        "type": "choices" if ex.options else "textarea", "value": value}]})
    return task


def _argilla_record(c: Candidate, run_id: str) -> dict:
    ex = c.example
    record = {"id": ex.id, "fields": {"question": ex.question, "context": _context(c)},
              "metadata": {"candidates": [answer_text(c, a) for a in c.answers], "reason": c.reason,
                           **({"options": list(ex.options)} if ex.options else {})},
              "suggestions": {}}
    if c.pseudo_label is not None:
        record["suggestions"][FROM] = {"value": answer_text(c, c.pseudo_label), "score": c.score,
                                       "agent": run_id}
    return record


# --- in -------------------------------------------------------------------------------


def read(path: str | Path) -> list[Label]:
    """The answers in a Label Studio JSON export, an Argilla export (JSON list or JSONL)
    or a suggestion CSV, by its content; items with no answer yet are left out."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the export: {e}", file=str(path)) from None
    if path.suffix.lower() == ".csv":
        return _read_csv(text, path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                            file=str(path), line=e.lineno) from None
        places = [f"item {i}" for i in range(len(rows))]
    else:
        rows, places = [], []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON at column {e.colno}: {e.msg}", file=str(path),
                                line=n) from None
            places.append(f"line {n}")
    labels = []
    for row, place in zip(rows, places):
        where = f"{path}: {place}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, found {type(row).__name__}")
        labels += _ls_labels(row, where) if "annotations" in row or "data" in row \
            else _argilla_labels(row, where)
    return labels


def _ls_labels(task: dict, where: str) -> list[Label]:
    data = task.get("data")
    if not isinstance(data, dict) or not str(data.get("item_id", "")).strip():
        raise DataError(f"{where}: field data.item_id: missing (not a task semievol suggested)")
    item, out = str(data["item_id"]), []
    for n, annotation in enumerate(task.get("annotations") or []):
        if annotation.get("was_cancelled"):
            continue
        for result in annotation.get("result") or []:
            if result.get("from_name") != FROM:
                continue
            value = result.get("value") or {}
            got = value.get("choices", value.get("text"))
            if not isinstance(got, list) or len(got) != 1 or not isinstance(got[0], str):
                raise DataError(f"{where} (item {item!r}, annotation {n}): field "
                                f"result.value: expected one answer, found {got!r}")
            out.append(Label(item, got[0], f"{where} (item {item!r}, annotation {n})", where))
    return out


def _argilla_labels(record: dict, where: str) -> list[Label]:
    item = record.get("id")
    if item is None or not str(item).strip():
        raise DataError(f"{where}: field id: missing")
    item, out = str(item), []
    responses = record.get("responses") or {}
    if isinstance(responses, dict):  # Argilla 2: {question name: [{value, user_id, status}]}
        answers = responses.get(FROM) or []
    else:  # flattened or 1.x style: [{values: {answer: {value}}, status}]
        answers = [{"value": (r.get("values") or {}).get(FROM, {}).get("value"),
                    "status": r.get("status")} for r in responses]
    status = record.get("status")
    for n, response in enumerate(answers):
        if response.get("status", status) not in (None, "submitted", "completed"):
            continue
        value = response.get("value")
        if not isinstance(value, str):
            raise DataError(f"{where} (item {item!r}, response {n}): field "
                            f"responses.{FROM}.value: expected text, found {value!r}")
        out.append(Label(item, value, f"{where} (item {item!r}, response {n})", where))
    return out


def _read_csv(text: str, path: Path) -> list[Label]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for name in ("id", "answer"):
        if name not in (reader.fieldnames or []):
            raise DataError(f"missing column (the header has {reader.fieldnames})",
                            file=str(path), line=1, field=name)
    out = []
    try:
        for row in reader:
            line = reader.line_num
            answer = (row.get("answer") or "").strip()
            if answer:
                where = f"{path}: line {line}"
                out.append(Label(str(row["id"]).strip(), answer, where, where))
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", file=str(path), line=reader.line_num) from None
    return out
