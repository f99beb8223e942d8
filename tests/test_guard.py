"""The guard on the fake backend, through the public API: a validation slice held out of
every fine-tune and retrieval pool picks the final model, and stops rounds."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from semievol import RunConfig, load_backend, report
from semievol.data import load_task
from semievol.demo import make_task
from semievol.guard import size, split
from semievol.pipeline import run
from semievol.types import Example

from test_pipeline import ticket_rule


@pytest.fixture()
def task_dir(tmp_path):
    return make_task(tmp_path / "data", sizes={"labeled": 40, "unlabeled": 120, "test": 60})


class Recorder:
    """Wraps a rule; keeps every prompt's earlier messages (the retrieved shots)."""

    def __init__(self, rule):
        self.rule, self.shown = rule, []

    def __call__(self, call):
        self.shown += [m["content"] for m in call.messages[:-1]]
        return self.rule(call)


def trained_on_pseudo_labels(call, unlabeled: set[str]) -> bool:
    return any(_question(ex[-2]["content"]) in unlabeled for ex in call.trained)


def _question(user: str) -> str:
    return user.split("\nOptions:")[0]


def world(task_dir, tmp_path, rule, **options):
    backend = load_backend("fake", rule=Recorder(rule))
    config = RunConfig(data=str(task_dir), backend="fake", **options)
    return run(config, backend, tmp_path / "run", quiet=True), backend


def assert_validation_never_trained_or_shown(results, backend, task_dir):
    task = load_task(task_dir)
    held = {ex.question for ex in task.labeled if ex.id in set(results["validation"]["ids"])}
    assert len(held) == results["validation"]["n"] == 8  # 20% of 40
    trained = {_question(m["content"]) for _, examples in backend.trained.values()
               for ex in examples for m in ex if m["role"] == "user"}
    assert trained and not held & trained
    shown = {_question(text) for text in backend.rule.shown}
    assert shown and not held & shown  # no retrieval pool holds them either


def test_when_pseudo_labels_hurt_the_warm_up_is_final(task_dir, tmp_path):
    unlabeled = {ex.question for ex in load_task(task_dir).unlabeled}

    def collapses(call):  # evolving on pseudo-labels teaches it one answer
        return "billing" if trained_on_pseudo_labels(call, unlabeled) else ticket_rule(call)

    results, backend = world(task_dir, tmp_path, collapses, rounds=2)
    scores = results["validation"]["scores"]
    assert scores["r1"]["accuracy"] < scores["sft"]["accuracy"]
    assert results["final"] == "sft" and results["models"]["final"] == results["models"]["warm"]
    assert results["eval"]["final"]["accuracy"] == results["eval"]["sft"]["accuracy"]
    assert results["eval"]["semievol"]["accuracy"] < results["eval"]["sft"]["accuracy"]
    assert len(results["rounds"]) == 1  # no second round after a round that did not help
    assert_validation_never_trained_or_shown(results, backend, task_dir)
    assert "SFT" in report.summary(results).split("guard:")[1]


def test_when_more_data_helps_semievol_is_final(task_dir, tmp_path):
    results, backend = world(task_dir, tmp_path, ticket_rule)
    scores = results["validation"]["scores"]
    assert scores["r1"]["accuracy"] > scores["sft"]["accuracy"]
    assert results["final"] == "semievol"
    assert results["models"]["final"] == results["models"]["evolved"] == results["rounds"][0]["model"]
    assert results["eval"]["final"] == results["eval"]["semievol"]
    assert_validation_never_trained_or_shown(results, backend, task_dir)
    fts = backend.calls_of("finetune")
    assert fts[0]["n_examples"] == 32  # the warm-up: 40 labels less the 8 held out
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    text = report.write_report(tmp_path / "run").read_text()
    assert "## Validation (the guard)" in text and "| SemiEvol round 1 |" in text
    assert "self-justified" in text and (tmp_path / "run" / "accuracy.png").exists()


def test_tie_goes_to_the_warm_up(task_dir, tmp_path):
    results, _ = world(task_dir, tmp_path, lambda call: "billing", justify="vote")
    assert results["validation"]["scores"]["r1"] == results["validation"]["scores"]["sft"]
    assert results["final"] == "sft"
    text = report.summary(results)
    assert "settled by vote" in text and "self-justified" not in text


def test_no_validation_returns_the_evolved_model(task_dir, tmp_path):
    results, backend = world(task_dir, tmp_path, ticket_rule, validation=0)
    assert results["validation"] == {"n": 0, "ids": [], "scores": {}, "chosen": None}
    assert results["final"] == "semievol" and backend.calls_of("finetune")[0]["n_examples"] == 40


def test_validation_rounds_continue_while_they_improve(task_dir, tmp_path):
    results, _ = world(task_dir, tmp_path, ticket_rule, rounds=3, validation=20)
    accuracies = [r["validation"] for r in results["rounds"]]
    assert all(b > a for a, b in zip(accuracies, accuracies[1:-1]))
    assert results["validation"]["chosen"] == f"r{accuracies.index(max(accuracies)) + 1}"


def test_size_and_split():
    assert [size(None, n) for n in (10, 16, 40, 64, 500, 5000)] == [0, 8, 8, 13, 100, 200]
    assert size(0, 64) == 0 and size(30, 64) == 30 and size(100, 5) == 4
    labeled = [Example(f"q{i}", f"question {i}", ("a", "b", "c"), "ABC"[i % 3 // 2])
               for i in range(60)]  # A twice as often as B
    train, held = split(labeled, 12, seed=1)
    assert Counter(ex.answer for ex in held) == {"A": 8, "B": 4}
    assert len(train) == 48 and not {ex.id for ex in train} & {ex.id for ex in held}
    assert split(labeled, 12, seed=1) == (train, held)
    assert split(labeled, 12, seed=2)[1] != held


def test_a_run_made_before_validation_resumes_without_one(task_dir, tmp_path):
    first, _ = world(task_dir, tmp_path, ticket_rule, validation=0)
    path = tmp_path / "run"
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["stages"]["validation"]  # as an older semievol wrote it
    for stage in [s for s in manifest["stages"] if s.startswith("eval")]:
        del manifest["stages"][stage]
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "validation.json").unlink()
    config = json.loads((path / "config.json").read_text())
    del config["validation"]
    (path / "config.json").write_text(json.dumps(config))
    backend = load_backend("fake", rule=ticket_rule)
    resumed = run(RunConfig(data=str(task_dir), backend="fake"), backend, path, quiet=True)
    assert resumed["validation"]["n"] == 0 and not backend.calls_of("finetune")
    assert resumed["eval"] == first["eval"]
