"""`semievol suggest` and `semievol import-labels` on the fake backend: the strategies'
order, the three output formats, the labels brought back (atomically, once), and every
malformed or conflicting export refused with both splits untouched."""
from __future__ import annotations

import csv
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from semievol import cli, suggest
from semievol.annotation import read
from semievol.backends import load_backend
from semievol.config import RunConfig
from semievol.data import load_split, load_task
from semievol.errors import DataError
from semievol.labels import JOURNAL, finish_pending, import_labels
from semievol.pipeline import run
from semievol.suggest import Candidate, rank
from semievol.types import Example

OPTIONS = ["negative", "neutral", "positive"]
WORDS = {"A": "fell", "B": "held", "C": "rose"}


def write_task(folder: Path, labeled=12, unlabeled=30, test=6) -> Path:
    """A small sentiment task in fpb's layout (no id column, letter answers, a gt column),
    the unlabeled answers present as in fpb (hidden at load time)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in [("labeled", labeled), ("unlabeled", unlabeled), ("test", test)]:
        with open(folder / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["question", "gt", "options", "answer"])
            for i in range(n):
                letter = "ABC"[(i * 7 + len(split)) % 3]
                w.writerow([f"{split} item {i}: the {['shares', 'sales', 'profit'][i % 3]} "
                            f"{WORDS[letter]} in quarter {i}", OPTIONS["ABC".index(letter)],
                            json.dumps(OPTIONS), letter])
    return folder


@pytest.fixture
def fake_run(tmp_path):
    data = write_task(tmp_path / "task")
    out = tmp_path / "run"
    run(RunConfig.recipe("small", data=str(data), backend="fake", validation=0),
        load_backend("fake", workdir=out / "backend"), out, quiet=True)
    return data, out


def cand(i: str, answers, entropy, label=None, settled=False, question=None) -> Candidate:
    return Candidate(Example(i, question or f"question {i}", tuple(OPTIONS)), tuple(answers),
                     tuple("x" for _ in answers), label if label is not None else answers[0],
                     entropy, settled)


def test_entropy_and_disagreement_rank_the_uncertain_first():
    items = [cand("sure", "BBBB", 0.1), cand("split", "ABCB", 0.3, "B", True),
             cand("unsure", "CCCC", 2.0), cand("none", [None] * 4, None, label=None)]
    items[3] = Candidate(items[3].example, (None,) * 4, ("",) * 4, None, None, False)
    assert [c.example.id for c in rank(items, 4, "entropy")] == ["none", "unsure", "split", "sure"]
    assert [c.example.id for c in rank(items, 3, "disagreement")] == ["none", "split", "unsure"]
    assert all(c.reason for c in rank(items, 4, "entropy"))
    assert rank(items, 3, "random", seed=1) == rank(items, 3, "random", seed=1)
    assert 0 < items[0].score <= 1 and items[3].score == 0


def test_combined_skips_near_duplicates_and_favours_the_thin_class():
    """Two copies of one uncertain question: only one is chosen; with one slot left and
    equal uncertainty, the class the labels lack wins."""
    q = "the shares fell sharply after the warning"
    items = [cand("a", "AACA", 1.5, "A", True, q), cand("a2", "AACA", 1.5, "A", True, q + " "),
             cand("n", "BBBB", 0.9, question="the company held its meeting in may"),
             cand("p", "CCCC", 0.9, question="profit rose on strong demand for phones")]
    backend = load_backend("fake")
    embed = lambda texts: np.asarray(backend.embed(texts))  # noqa: E731
    labeled = [Example(f"l{i}", f"labeled {i} neutral words", tuple(OPTIONS), "B") for i in range(6)]
    chosen = rank(items, 3, "combined", labeled=labeled, embed=embed)
    ids = [c.example.id for c in chosen]
    assert ids[0] == "a" and "a2" not in ids
    assert ids.index("p") < ids.index("n")  # positive has no labels, neutral six
    assert "has 0 labels" in chosen[ids.index("p")].reason


def test_suggest_writes_the_three_formats(fake_run, tmp_path, capsys):
    data, out = fake_run
    run_id = json.loads((out / "manifest.json").read_text())["run_id"]
    assert cli.main(["suggest", str(out), "-k", "5", "--out", str(tmp_path / "t.json")]) == 0
    tasks = json.loads((tmp_path / "t.json").read_text())
    assert len(tasks) == 5 and len({t["data"]["item_id"] for t in tasks}) == 5
    for t in tasks:
        (pred,) = t["predictions"]
        assert pred["model_version"] == run_id and 0 < pred["score"] <= 1
        assert pred["result"][0]["value"]["choices"][0] in OPTIONS
        assert t["data"]["question"] and t["data"]["reason"] and len(t["data"]["candidates"]) == 4
    view = ET.fromstring((tmp_path / "t.xml").read_text())
    assert [c.get("value") for c in view.iter("Choice")] == OPTIONS
    assert cli.main(["suggest", str(out), "-k", "4", "--format", "argilla", "--strategy",
                     "entropy", "--out", str(tmp_path / "r.jsonl")]) == 0
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["suggestions"]["answer"]["agent"] == run_id for r in records)
    assert cli.main(["suggest", str(out), "-k", "3", "--format", "csv", "--strategy",
                     "disagreement", "--out", str(tmp_path / "s.csv")]) == 0
    rows = load_split(tmp_path / "s.csv", require_answer=False)  # the task's own format
    assert len(rows) == 3 and all(r.options == tuple(OPTIONS) and r.answer is None for r in rows)


def answer_csv(suggested: Path, data: Path, out: Path, wrong: dict | None = None) -> dict:
    """Fill the suggestion CSV's answers from the hidden gold answers (an oracle)."""
    hidden = load_task(data).hidden
    rows = list(csv.DictReader(open(suggested)))
    gold = {}
    for row in rows:
        gold[row["id"]] = hidden[row["id"]]
        row["answer"] = (wrong or {}).get(row["id"], OPTIONS["ABC".index(hidden[row["id"]])])
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return gold


def test_import_labels_moves_items_once_and_the_next_run_is_new(fake_run, tmp_path, monkeypatch):
    data, out = fake_run
    cli.main(["suggest", str(out), "-k", "4", "--format", "csv", "--out", str(tmp_path / "s.csv")])
    gold = answer_csv(tmp_path / "s.csv", data, tmp_path / "done.csv")
    before = load_task(data)
    done = import_labels(tmp_path / "done.csv", data)
    after = load_task(data)
    assert sorted(done.added) == sorted(gold) and done.backup.is_dir()
    assert len(after.labeled) == len(before.labeled) + 4
    assert len(after.unlabeled) == len(before.unlabeled) - 4
    assert {ex.id: ex.answer for ex in after.labeled if ex.id in gold} == gold
    assert not set(gold) & {ex.id for ex in after.unlabeled}
    # the ids that stayed unlabeled kept their ids (written out now), and their answers hidden
    assert {ex.id for ex in after.unlabeled} == {ex.id for ex in before.unlabeled} - set(gold)
    assert (done.backup / "labeled.csv").read_bytes() != (data / "labeled.csv").read_bytes()
    files = {p.name: p.read_bytes() for p in data.glob("*.csv")}
    again = import_labels(tmp_path / "done.csv", data)
    assert again.added == [] and sorted(again.already) == sorted(gold) and again.backup is None
    assert {p.name: p.read_bytes() for p in data.glob("*.csv")} == files
    # a suggestion after the import skips what was labeled
    cli.main(["suggest", str(out), "-k", "100", "--format", "csv", "--out", str(tmp_path / "t.csv")])
    assert not set(gold) & {r.id for r in load_split(tmp_path / "t.csv", require_answer=False)}
    # the next run with the default --out starts a new run directory
    monkeypatch.chdir(tmp_path)
    first = cli.default_out(before, "fake")
    run(RunConfig.recipe("small", data=str(data), backend="fake", validation=0),
        load_backend("fake"), first, task=before, quiet=True)
    assert cli.default_out(before, "fake") == first  # same data: resume it
    assert cli.default_out(after, "fake") == Path("runs/task-fake-2")


def snapshot(data: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(data.iterdir()) if p.is_file()}


def ls_export(path: Path, tasks: list[tuple[str, list[str]]]) -> Path:
    """A Label Studio JSON export: one task per (item id, answers of its annotations)."""
    path.write_text(json.dumps([
        {"id": n, "data": {"item_id": item},
         "annotations": [{"result": [{"from_name": "answer", "to_name": "question",
                                      "type": "choices", "value": {"choices": [a]}}],
                          "was_cancelled": False} for a in answers]}
        for n, (item, answers) in enumerate(tasks)]))
    return path


@pytest.mark.parametrize("tasks, problem", [
    ([("unlabeled-0", ["neutral"]), ("nope-7", ["neutral"])], r"item 1.*field id: unknown item 'nope-7'"),
    ([("unlabeled-1", ["neutral", "positive"])], r"item 0.*field answer: conflicting answers for item 'unlabeled-1'"),
    ([("unlabeled-2", ["neutral"]), ("unlabeled-2", ["neutral"])], r"item 1.*field id: duplicate item 'unlabeled-2'"),
    ([("unlabeled-3", ["bullish"])], r"item 0.*field answer: 'bullish' is not an option.*'unlabeled-3'"),
    ([("labeled-0", ["negative" if True else ""])], r"field answer: item 'labeled-0' is labeled"),
])
def test_a_bad_export_changes_nothing_and_names_the_problem(tmp_path, tasks, problem):
    data = write_task(tmp_path / "task")
    if tasks[0][0] == "labeled-0":  # labeled-0 is 'B' (neutral): say something else
        tasks = [("labeled-0", ["positive"])]
    before = snapshot(data)
    export = ls_export(tmp_path / "export.json", tasks)
    with pytest.raises(DataError, match=problem) as e:
        import_labels(export, data)
    assert str(export) in str(e.value)
    assert snapshot(data) == before and not (data / ".backup").exists()


def test_malformed_exports_are_refused(tmp_path):
    data = write_task(tmp_path / "task")
    before = snapshot(data)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"data": {"item_id": "unlabeled-0"}, "annotations": [}]')
    with pytest.raises(DataError, match="invalid JSON"):
        import_labels(bad, data)
    bad.write_text(json.dumps([{"data": {"text": "no item id"}, "annotations": []}]))
    with pytest.raises(DataError, match=r"item 0: field data.item_id: missing"):
        import_labels(bad, data)
    argilla = tmp_path / "records.jsonl"
    argilla.write_text(json.dumps({"id": "unlabeled-0", "responses": {"answer": [
        {"value": 3, "status": "submitted"}]}}) + "\n")
    with pytest.raises(DataError, match=r"line 1 .*field responses.answer.value"):
        import_labels(argilla, data)
    assert snapshot(data) == before


def test_argilla_and_label_studio_exports_read_back(tmp_path):
    data = write_task(tmp_path / "task")
    argilla = tmp_path / "records.jsonl"
    argilla.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "unlabeled-0", "responses": {"answer": [{"value": "neutral", "status": "submitted"}]}},
        {"id": "unlabeled-1", "responses": {"answer": [{"value": "positive", "status": "draft"}]}},
        {"id": "unlabeled-2", "responses": {}}]))
    assert [(l.item_id, l.answer) for l in read(argilla)] == [("unlabeled-0", "neutral")]
    assert import_labels(argilla, data).added == ["unlabeled-0"]
    assert load_task(data).labeled[-1].answer == "B"


def test_an_import_killed_between_its_renames_is_finished_next_time(tmp_path):
    """The journal names both staged files; a kill after the first rename leaves data that
    load_task refuses (an id in both splits) until finish_pending completes the import."""
    data = write_task(tmp_path / "task")
    export = ls_export(tmp_path / "e.json", [("unlabeled-4", ["negative"])])
    import_labels(export, data)
    grown = snapshot(data)
    for name, text in grown.items():  # stage the same import again, by hand, half done
        (data / f".{name}.import").write_bytes(text)
    backup = next((data / ".backup").iterdir())
    (data / "labeled.csv").write_bytes((data / ".labeled.csv.import").read_bytes())
    os.replace(data / ".labeled.csv.import", data / "labeled.csv")
    (data / "unlabeled.csv").write_bytes((backup / "unlabeled.csv").read_bytes())
    (data / JOURNAL).write_text(json.dumps({"replace": {
        str(data / ".unlabeled.csv.import"): str(data / "unlabeled.csv")}, "backup": str(backup)}))
    (data / ".test.csv.import").unlink()
    with pytest.raises(DataError, match="also a labeled id"):
        load_task(data)
    finish_pending(data)
    assert snapshot(data) == grown and load_task(data)


def test_embeddings_are_computed_once_per_run_directory(fake_run):
    """'combined' embeds through the backend once; later suggestions read the cache."""
    data, out = fake_run
    backend = load_backend("fake")
    first, _ = suggest.suggest(out, 5, "combined", backend=backend)
    embedded = [call for call in backend.calls if call[0] == "embed"]
    assert embedded and (out / "suggest_embeddings.npz").exists()
    again, _ = suggest.suggest(out, 5, "combined", backend=backend)
    assert [call for call in backend.calls if call[0] == "embed"] == embedded
    assert [c.example.id for c in again] == [c.example.id for c in first]
