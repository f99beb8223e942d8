"""The algorithm on the fake backend: every stage, the switches, rounds, resume, and that
the hidden unlabeled answers are never read by the algorithm."""
from __future__ import annotations

import json

import pytest

from semievol import RunConfig, load_backend, selection
from semievol.collaborate import make_views
from semievol.demo import make_task
from semievol.errors import ConfigError
from semievol.pipeline import run
from semievol.types import PseudoLabel

from worlds import Metered, ticket_rule


@pytest.fixture()
def task_dir(tmp_path):
    return make_task(tmp_path / "data", sizes={"labeled": 24, "unlabeled": 120, "test": 60})


def go(task_dir, tmp_path, backend=None, name="run", **options):
    """A run as the paper has it: no validation slice, unless asked (see test_guard.py)."""
    backend = backend or load_backend("fake", rule=ticket_rule)
    options.setdefault("validation", 0)
    config = RunConfig(data=str(task_dir), backend="fake", **options)
    return run(config, backend, tmp_path / name, quiet=True), backend


def test_stages_and_results_are_wired_together(task_dir, tmp_path):
    """Wiring, not quality: ticket_rule is scripted to know more the more it was trained on,
    so a model trained on the labels must score above the untrained one here."""
    results, backend = go(task_dir, tmp_path)
    assert set(results) >= {"backend", "base_model", "models", "eval", "unlabeled", "usage", "timings_s"}
    fts = backend.calls_of("finetune")
    assert len(fts) == 2
    assert fts[0]["base"] == "fake-base" and fts[0]["n_examples"] == 24
    assert fts[1]["base"] == results["models"]["warm"]  # evolve continues the warm model
    u = results["unlabeled"]
    assert u["total"] == 120 and u["consistent"] + u["justified"] == 120
    assert 50 <= u["selected"] <= 90
    acc = u["pseudo_label_accuracy"]
    assert acc["selected"] > acc["all"]
    ev = results["eval"]
    assert ev["sft"]["accuracy"] > ev["vanilla"]["accuracy"]   # evaluated the trained model
    assert ev["semievol"]["n"] == 60 and 0 <= ev["semievol"]["macro_f1"] <= 1
    assert results["usage"]["prompt_tokens"] > 0 and results["usage"]["cost_usd"] is None
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results


def test_consistent_answers_skip_justify_and_disagreements_are_justified(task_dir, tmp_path):
    results, backend = go(task_dir, tmp_path)
    records = [json.loads(l) for l in (tmp_path / "run" / "collaborate_r1.jsonl").read_text().splitlines()]
    assert len(records) == 120 and len({r["id"] for r in records}) == 120
    for r in records:
        assert len(r["responses"]) == 4
        if r["consistent"]:
            assert not r["justified"] and r["pseudo_label"] == r["answers"][0]
        else:
            assert r["justified"] and r["justify_response"]
            assert r["entropy"] > 0.2  # the verdict's own entropy
    assert results["unlabeled"]["justified"] == sum(not r["consistent"] for r in records) > 0


def test_threshold_is_the_theta_percentile():
    entropies = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert selection.threshold(entropies, 0.5) == pytest.approx(0.3)
    assert selection.threshold(entropies, 0.25) == pytest.approx(0.2)
    records = [PseudoLabel(str(i), "A", h) for i, h in enumerate(entropies)]
    records.append(PseudoLabel("x", None, None))
    kept, tau = selection.select(records, 0.5)
    assert [r.id for r in kept] == ["0", "1"] and tau == pytest.approx(0.3)  # H < tau
    assert len(selection.select(records, 1.0)[0]) == 5
    assert len(selection.select(records, 0.5, adaptive=False)[0]) == 5


def test_views():
    assert make_views(4, 1.0, icp=True) == [make_views(4, 1.0, icp=True)[0]]
    assert make_views(1, 1.0, icp=False)[0].temperature == 0.0
    diverse = make_views(4, 1.0, icp=True, kind="diverse")
    assert len({v.temperature for v in diverse}) == 4 and len({v.seed_offset for v in diverse}) == 4
    assert {v.shots for v in diverse} == {True, False}
    mixed = make_views(4, 1.0, icp=True, kind="mixed")
    assert [(v.shots, v.samples) for v in mixed] == [(True, 2), (False, 2)]
    assert len({v.seed_offset for v in mixed}) == 2
    assert make_views(4, 1.0, icp=False, kind="mixed") == make_views(4, 1.0, icp=False)


def test_mixed_views_read_each_question_with_and_without_shots(task_dir, tmp_path):
    seen = []

    def rule(call):
        if "Candidate answers" not in call.user and call.temperature > 0:
            seen.append((call.user, len(call.messages) > 2))
        return ticket_rule(call)

    results, backend = go(task_dir, tmp_path, load_backend("fake", rule=rule), views="mixed")
    mining = [c for c in backend.calls_of("generate") if c["temperature"] > 0]
    assert {c["n"] for c in mining} == {2}
    with_shots = sum(shots for _, shots in seen)
    assert with_shots == len(seen) - with_shots == 2 * results["unlabeled"]["total"]


def test_replay_labeled_evolves_on_labeled_and_selected(task_dir, tmp_path):
    results, backend = go(task_dir, tmp_path, replay_labeled=True)
    evolve_call = backend.calls_of("finetune")[-1]
    assert evolve_call["n_examples"] == 24 + results["unlabeled"]["selected"]


def test_without_iwp_mines_with_the_base_and_trains_once(task_dir, tmp_path):
    results, backend = go(task_dir, tmp_path, iwp=False)
    fts = backend.calls_of("finetune")
    assert len(fts) == 1 and fts[0]["base"] == "fake-base"
    assert fts[0]["n_examples"] == 24 + results["unlabeled"]["selected"]
    assert results["eval"]["sft"] is None and results["models"]["warm"] is None
    mining = [c for c in backend.calls_of("generate") if c["n"] == 4]
    assert {c["model"] for c in mining} == {"fake-base"}


def test_without_icp_no_retrieval_and_no_shots(task_dir, tmp_path):
    seen = []

    def rule(call):
        seen.append(len(call.messages))
        return ticket_rule(call)

    _, backend = go(task_dir, tmp_path, backend=load_backend("fake", rule=rule), icp=False)
    assert backend.calls_of("embed") == [] and set(seen) == {2}
    _, backend = go(task_dir, tmp_path, name="with", backend=load_backend("fake", rule=rule))
    assert backend.calls_of("embed") and 2 + 2 * 3 in seen  # system + 3 solved shots + question


def test_without_cl_one_greedy_inference_and_no_justify(task_dir, tmp_path):
    results, backend = go(task_dir, tmp_path, cl=False)
    gens = backend.calls_of("generate")
    assert all(c["n"] == 1 and c["temperature"] == 0.0 for c in gens)
    assert results["unlabeled"]["justified"] == 0


def test_without_as_keeps_every_pseudo_label(task_dir, tmp_path):
    results, _ = go(task_dir, tmp_path, adaptive_selection=False)
    assert results["unlabeled"]["selected"] == 120


def test_rounds_mine_the_rest_and_continue_training(task_dir, tmp_path):
    results, backend = go(task_dir, tmp_path, rounds=2)
    r1, r2 = results["rounds"]
    assert r2["mined"] == 120 - r1["selected"]
    ids1 = {json.loads(l)["id"] for l in (tmp_path / "run" / "collaborate_r1.jsonl").open()}
    ids2 = {json.loads(l)["id"] for l in (tmp_path / "run" / "collaborate_r2.jsonl").open()}
    sel1 = set(json.loads((tmp_path / "run" / "selection_r1.json").read_text())["selected"])
    assert ids2 == ids1 - sel1
    fts = backend.calls_of("finetune")
    assert len(fts) == 3 and fts[2]["base"] == r1["model"]
    assert results["models"]["evolved"] == r2["model"]
    assert results["unlabeled"]["selected"] == r1["selected"] + r2["selected"]


class Tripwire(dict):
    """Hidden answers that count the reads made before reporting starts."""

    def __init__(self, data):
        super().__init__(data)
        self.reporting, self.early_reads = False, 0

    def _note(self):
        self.early_reads += not self.reporting


def _noting(name):
    def read(self, *a):
        self._note()
        return getattr(dict, name)(self, *a)
    return read


for _name in ("get", "__getitem__", "__iter__", "__contains__", "__len__"):
    setattr(Tripwire, _name, _noting(_name))


def test_hidden_answers_are_never_read_by_the_algorithm(task_dir, tmp_path, monkeypatch):
    from semievol import pipeline
    from semievol.data import load_task

    task = load_task(task_dir)
    assert all(ex.answer is None for ex in task.unlabeled)
    task.hidden = hidden = Tripwire(task.hidden)
    report = pipeline._results

    def reporting(*args, **kwargs):
        hidden.reporting = True
        return report(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_results", reporting)
    results = run(RunConfig(data=str(task_dir), backend="fake"),
                  load_backend("fake", rule=ticket_rule), tmp_path / "run", task=task, quiet=True)
    assert hidden.reporting and hidden.early_reads == 0
    assert results["unlabeled"]["pseudo_label_accuracy"]["all"] is not None


def test_resume_after_a_crash_loses_and_repeats_nothing(task_dir, tmp_path):
    calls = {"n": 0}

    def crashing(call):
        calls["n"] += 1
        if calls["n"] > 24 * 4 + 16 * 4:  # part-way through collaborate
            raise KeyboardInterrupt("killed")
        return ticket_rule(call)

    with pytest.raises(KeyboardInterrupt):
        go(task_dir, tmp_path, backend=load_backend("fake", rule=crashing), generation_batch=8)
    partial = (tmp_path / "run" / "collaborate_r1.jsonl").read_text().splitlines()
    assert 0 < len(partial) < 120
    backend = load_backend("fake", rule=ticket_rule)
    results, _ = go(task_dir, tmp_path, backend=backend, generation_batch=8)
    lines = [json.loads(l) for l in (tmp_path / "run" / "collaborate_r1.jsonl").open()]
    assert len(lines) == 120 and len({r["id"] for r in lines}) == 120
    assert lines[: len(partial)] == [json.loads(l) for l in partial]
    fts = backend.calls_of("finetune")
    assert [f["key"].endswith("evolve-r1") for f in fts] == [True]  # no second warm-up
    first_mining = [c for c in backend.calls_of("generate") if c["n"] == 4]
    assert sum(c["n_prompts"] for c in first_mining) == 120 - len(partial)
    assert results["unlabeled"]["total"] == 120


def test_torn_last_line_is_dropped_on_resume(task_dir, tmp_path):
    go(task_dir, tmp_path, limit_test=8)
    path = tmp_path / "run" / "eval_semievol.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:10])  # a kill mid-write
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    del manifest["stages"]["eval_semievol"]
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    results, backend = go(task_dir, tmp_path, limit_test=8)
    assert len(path.read_text().splitlines()) == 8
    assert sum(c["n_prompts"] for c in backend.calls_of("generate")) == 3
    assert results["eval"]["semievol"]["n"] == 8


def test_resuming_with_another_configuration_is_refused(task_dir, tmp_path):
    go(task_dir, tmp_path, limit_test=8)
    with pytest.raises(ConfigError, match="theta"):
        go(task_dir, tmp_path, limit_test=8, theta=0.3)


def test_per_class_selection_keeps_every_class():
    # The majority class is the surest: a global threshold keeps only it.
    records = [PseudoLabel(f"b{i}", "B", 0.01 * i) for i in range(10)]
    records += [PseudoLabel(f"a{i}", "A", 1 + 0.1 * i) for i in range(4)]
    kept, _ = selection.select(records, 0.5)
    assert {r.pseudo_label for r in kept} == {"B"}
    kept, _ = selection.select(records, 0.5, per_class=True)
    assert [r.id for r in kept if r.pseudo_label == "A"] == ["a0", "a1"]
    assert len([r for r in kept if r.pseudo_label == "B"]) == 5


def test_vote_settles_disagreements_without_asking_the_model(task_dir, tmp_path):
    asked = []

    def rule(call):
        asked.append("Candidate answers" in call.user)
        return ticket_rule(call)

    results, _ = go(task_dir, tmp_path, backend=load_backend("fake", rule=rule), justify="vote")
    records = [json.loads(l) for l in (tmp_path / "run" / "collaborate_r1.jsonl").open()]
    assert asked and not any(asked)
    for r in records:
        if not r["consistent"]:
            votes = [a for a in r["answers"] if a is not None]
            assert r["justified"] and "justify_response" not in r
            assert votes.count(r["pseudo_label"]) == max(votes.count(a) for a in votes)
    assert results["unlabeled"]["justified"] == sum(not r["consistent"] for r in records)


def test_usage_survives_a_kill_mid_stage(task_dir, tmp_path):
    """SIGKILL-like death (os._exit: no finally, no handlers) part-way through mining: the
    manifest already holds the tokens of every persisted batch, and the resumed run adds
    exactly what its own calls used (nothing lost, nothing counted twice)."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); import worlds as t; "
              "from semievol import RunConfig, load_backend; from semievol.pipeline import run\n"
              "calls = [0]\n"
              "def dying(call):\n"
              "    calls[0] += 1\n"
              "    if calls[0] > 24 * 4 + 16 * 4: os._exit(9)\n"
              "    return t.ticket_rule(call)\n"
              "run(RunConfig(data=sys.argv[2], backend='fake', generation_batch=8, validation=0), "
              "load_backend('fake', rule=dying), sys.argv[3], quiet=True)")
    killed = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent),
                             str(task_dir), str(tmp_path / "run")], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    mined = len((tmp_path / "run" / "collaborate_r1.jsonl").read_text().splitlines())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    mining = manifest["usage_by_stage"]["collaborate_r1"]
    assert 0 < mined < 120 and mining["prompt_tokens"] > 0 and mining["completion_tokens"] > 0
    metered = Metered(load_backend("fake", rule=ticket_rule))
    resumed, _ = go(task_dir, tmp_path, backend=metered, generation_batch=8)
    for kind in ("prompt_tokens", "completion_tokens", "trained_tokens"):
        assert resumed["usage"][kind] == manifest["usage"][kind] + getattr(metered.used, kind)
    assert resumed["usage_by_stage"]["collaborate_r1"]["prompt_tokens"] > mining["prompt_tokens"]


def test_resume_reads_an_older_config_and_lets_batch_sizes_change(task_dir, tmp_path):
    go(task_dir, tmp_path, limit_test=8, per_class=True)
    path = tmp_path / "run" / "config.json"
    saved = json.loads(path.read_text())
    assert saved["schema"] == 1
    # a run made before 'replay_labeled' existed: its default is what that run did
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "replay_labeled"}))
    go(task_dir, tmp_path, limit_test=8, per_class=True, generation_batch=3)
    assert json.loads(path.read_text())["generation_batch"] == 3
    # a field missing there reads as its default, which differs from the one asked now
    path.write_text(json.dumps({k: v for k, v in saved.items() if k != "per_class"}))
    with pytest.raises(ConfigError, match="per_class"):
        go(task_dir, tmp_path, limit_test=8, per_class=True)


def test_each_eval_answer_records_how_sure_the_model_was(task_dir, tmp_path):
    go(task_dir, tmp_path, limit_test=8)
    lines = [json.loads(l) for l in (tmp_path / "run" / "eval_sft.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    assert all(isinstance(r["entropy"], float) and r["entropy"] >= 0 for r in lines)
