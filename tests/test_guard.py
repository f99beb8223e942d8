"""The guard on the fake backend, through the public API: a validation slice held out of
every fine-tune and retrieval pool picks the final model, and stops rounds."""
from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from semievol import RunConfig, guard, load_backend, report
from semievol.data import load_task
from semievol.demo import make_task
from semievol.guard import SAMPLES, brier, choose, compare, significantly_better, size, split
from semievol.pipeline import run
from semievol.types import Example

from worlds import (Recorder, collapsing, other, question, retrieval_helps, say, steady, team_of,
                    ticket_rule)


@pytest.fixture()
def task_dir(tmp_path):
    return make_task(tmp_path / "data", sizes={"labeled": 40, "unlabeled": 120, "test": 60})


def world(task_dir, tmp_path, rule, **options):
    backend = load_backend("fake", rule=Recorder(rule))
    config = RunConfig(data=str(task_dir), backend="fake", **options)
    return run(config, backend, tmp_path / "run", quiet=True), backend


def assert_validation_never_trained_or_shown(results, backend, task_dir):
    task = load_task(task_dir)
    held = {ex.question for ex in task.labeled if ex.id in set(results["validation"]["ids"])}
    assert len(held) == results["validation"]["n"] == 8  # 20% of 40
    trained = {question(m["content"]) for _, examples in backend.trained.values()
               for ex in examples for m in ex if m["role"] == "user"}
    assert trained and not held & trained
    shown = {question(text) for text in backend.rule.shown}
    assert shown and not held & shown  # no retrieval pool holds them either


def test_when_pseudo_labels_hurt_the_warm_up_is_final(task_dir, tmp_path):
    # evolving on pseudo-labels teaches it one answer
    collapses = collapsing({ex.question for ex in load_task(task_dir).unlabeled})

    results, backend = world(task_dir, tmp_path, collapses, rounds=2)
    scores = results["validation"]["scores"]
    assert scores["r1"]["accuracy"] < scores["sft"]["accuracy"]
    assert results["final"] == "sft" and results["models"]["final"] == results["models"]["warm"]
    assert results["eval"]["final"]["accuracy"] == results["eval"]["sft"]["accuracy"]
    assert results["eval"]["semievol"]["accuracy"] < results["eval"]["sft"]["accuracy"]
    assert len(results["rounds"]) == 1  # no second round after a round that did harm
    assert_validation_never_trained_or_shown(results, backend, task_dir)
    (verdict,) = results["validation"]["comparisons"]
    assert verdict["harm"] and verdict["p_harm"] < 0.05 and verdict["interval"][0] > 0
    decision = report.summary(results).split("guard: ")[1]
    assert decision.startswith("returned SFT: on 8 held-out questions SemiEvol put")
    assert "evidence that evolving made the model worse" in decision


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
    table = text.split("## Validation (the guard)")[1].split("\n\n## ")[0]
    assert "| SFT |" in table and "| SemiEvol |" in table
    assert [row for row in table.splitlines() if row.endswith("| final |")][0].startswith("| SemiEvol |")
    assert "self-justified" in text and (tmp_path / "run" / "accuracy.png").exists()
    assert "![validation](validation.png)" in text and (tmp_path / "run" / "validation.png").exists()


def test_without_evidence_of_harm_the_evolved_model_is_kept(task_dir, tmp_path):
    results, backend = world(task_dir, tmp_path, steady, justify="vote")
    v = results["validation"]
    assert backend.calls_of("finetune")[1]["n_examples"] > 0  # it did evolve
    (verdict,) = v["comparisons"]
    assert verdict["candidate"] == "r1" and verdict["incumbent"] == "sft" and not verdict["harm"]
    assert verdict["difference"] == 0 and verdict["interval"] == [0, 0] and verdict["p_harm"] == 1
    assert results["final"] == "semievol" and v["chosen"] == "r1"
    text = report.summary(results)
    assert "settled by vote" in text and "self-justified" not in text
    assert "kept SemiEvol: on 8 held-out questions it put" in text and "no evidence of harm" in text
    # the per-question evidence is in results.json, each question sampled guard.SAMPLES times
    assert {label: [r["id"] for r in records] for label, records in v["evidence"].items()} == \
        {"sft": v["ids"], "r1": v["ids"]}
    assert all(sum(r["answers"].values()) == SAMPLES for rs in v["evidence"].values() for r in rs)
    sampled = [c for c in backend.calls_of("generate") if c["n"] == SAMPLES]
    assert len(sampled) == 2 and all(c["temperature"] == 1.0 for c in sampled)


def test_no_validation_returns_the_evolved_model(task_dir, tmp_path):
    results, backend = world(task_dir, tmp_path, ticket_rule, validation=0)
    assert results["validation"] == {"n": 0, "ids": [], "scores": {}, "chosen": None,
                                     "samples": SAMPLES, "comparisons": [], "evidence": {}}
    assert results["final"] == "semievol" and backend.calls_of("finetune")[0]["n_examples"] == 40


def test_refit_gives_the_slice_back_to_the_model_the_guard_chose(task_dir, tmp_path):
    collapses = collapsing({ex.question for ex in load_task(task_dir).unlabeled})

    for name, rule, final in (("helped", ticket_rule, "semievol"), ("hurt", collapses, "sft")):
        results, backend = world(task_dir, tmp_path / name, rule, refit=True)
        assert results["final"] == final and results["refit"]["labeled"] == 40
        fts = backend.calls_of("finetune")
        sizes = [c["n_examples"] for c in fts]
        assert sizes[0] == 32 and sizes[2] == 40  # the guarded warm-up, then the refit's
        refit = json.loads((tmp_path / name / "run" / "refit" / "results.json").read_text())
        assert refit["validation"]["n"] == 0
        kind = {"semievol": "evolved", "sft": "warm"}[final]
        assert results["models"]["final"] == refit["models"][kind] == f"fake-ft:{fts[-1]['key']}"
        assert results["eval"]["final"] == refit["eval"][final]
        assert (refit["unlabeled"]["total"] > 0) == (final == "semievol")  # no mining for SFT
        assert f"Final ({'SemiEvol' if final == 'semievol' else 'SFT'}, refit)" in report.summary(results)
    assert len(fts) == 3  # hurt: warm-up, evolve, the refit's warm-up only


def test_rounds_go_on_until_the_slice_shows_harm(task_dir, tmp_path):
    results, _ = world(task_dir, tmp_path, ticket_rule, rounds=3, validation=20)
    assert len(results["rounds"]) == 3 and results["validation"]["chosen"] == "r3"
    assert [(c["candidate"], c["incumbent"]) for c in results["validation"]["comparisons"]] == \
        [("r1", "sft"), ("r2", "r1"), ("r3", "r2")]
    assert "round 3" in report.summary(results).split("guard:")[1].splitlines()[0]


def test_a_finished_run_given_more_rounds_goes_on_and_given_fewer_reports_those(task_dir, tmp_path):
    backend = load_backend("fake", rule=ticket_rule)  # one backend: it knows the models it made

    def go(name, rounds):
        config = RunConfig(data=str(task_dir), backend="fake", rounds=rounds, validation=20)
        results = run(config, backend, tmp_path / name, quiet=True)
        return results["eval"], [(r["mined"], r["selected"]) for r in results["rounds"]], results["final"]

    one = go("extended", 1)
    trained = len(backend.calls_of("finetune"))
    two = go("extended", 2)
    assert len(backend.calls_of("finetune")) == trained + 1  # round 2's evolve, nothing again
    assert two == go("fresh", 2) and len(two[1]) == 2

    def scored():
        return json.loads((tmp_path / "extended" / "manifest.json").read_text())["stages"]["eval_semievol"]["model"]
    assert scored().endswith("evolve-r2")
    assert go("extended", 1) == one and scored().endswith("evolve-r1")  # scored again


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


# --- recipe 'auto' -------------------------------------------------------------------

def auto(task_dir, tmp_path, rule, **options):
    return world(task_dir, tmp_path, rule, **{**options, "auto_recipe": True})


def test_auto_takes_retrieval_where_it_makes_the_pseudo_labels_right(task_dir, tmp_path):
    results, backend = auto(task_dir, tmp_path, retrieval_helps)
    recipe = results["recipe"]
    by = {(c["settings"]["icp"], c["settings"]["justify"]): c["accuracy"] for c in recipe["candidates"]}
    assert by[(True, "vote")] == by[(True, "model")] == 1.0
    assert by[(False, "model")] == 1.0 > by[(False, "vote")]
    assert recipe["chosen"]["justify"] == "model" and recipe["chosen"]["icp"] is False  # first of the ties
    assert results["config"]["justify"] == "model" and results["config"]["auto_recipe"]
    assert recipe["cost_s"] >= 0 and "choose_icp-True_justify-vote" in recipe["cost_stages"]
    assert "recipe auto chose: retrieved examples off, disagreements settled by the model" \
        in report.summary(results)
    assert_validation_never_trained_or_shown(results, backend, task_dir)


def test_auto_settles_disagreements_by_vote_when_the_model_cannot(task_dir, tmp_path):
    def vote_wins(call):  # self-justify names a wrong team; 3 samples of 4 are right
        if "Candidate answers" in call.user:
            return say(other(team_of(call.user)), 0.1)
        truth = team_of(call.user)
        if call.temperature == 0:
            return say(truth, 0.05)
        return say(other(truth), 0.5) if call.sample == 0 else say(truth, 0.2)

    results, _ = auto(task_dir, tmp_path, vote_wins)
    assert results["recipe"]["chosen"]["justify"] == "vote"
    assert results["recipe"]["chosen"]["icp"] is False


def test_auto_keeps_labeled_replay_only_where_it_helps(task_dir, tmp_path):
    labeled = {ex.question for ex in load_task(task_dir).labeled}

    def forgets_without_replay(call):
        """A model evolved on pseudo-labels alone forgets what it learned of the labels."""
        replays = sum(question(ex[-2]["content"]) in labeled for ex in call.trained)
        if call.trained and replays == 32 and len(call.trained) > 32:
            return "billing"
        return ticket_rule(call)

    results, backend = auto(task_dir, tmp_path, forgets_without_replay)
    assert results["recipe"]["chosen"]["replay_labeled"] is True
    assert results["config"]["replay_labeled"] is True
    evolves = [c for c in backend.calls_of("finetune") if "evolve" in c["key"]]
    assert {c["key"].split("-evolve-")[1] for c in evolves} == {"r1_replay", "r1_alone"}
    assert results["models"]["evolved"].endswith("r1_replay")
    scored = [p.name for p in (tmp_path / "run").glob("eval_validation_*.jsonl")]
    assert sorted(scored) == ["eval_validation_r1_alone.jsonl", "eval_validation_r1_replay.jsonl",
                              "eval_validation_sft.jsonl", "eval_validation_vanilla.jsonl"]

    def overfits_with_replay(call):  # a third pass over the labels overfits them
        replays = sum(question(ex[-2]["content"]) in labeled for ex in call.trained)
        return "billing" if replays > 32 else ticket_rule(call)

    # 20 validation questions: on 8, this collapse is five questions won to one lost (p = 0.11)
    results, _ = auto(task_dir, tmp_path / "2", overfits_with_replay, validation=20)
    assert results["recipe"]["chosen"]["replay_labeled"] is False
    assert results["models"]["evolved"].endswith("r1_alone") and results["final"] == "semievol"


def test_a_run_killed_while_choosing_the_recipe_resumes_its_trials(task_dir, tmp_path):
    """Recipe 'auto' mines with the ordinary stages, so a trial finished before a kill is not
    mined again, and one killed part-way goes on after its last finished batch."""
    calls = {"n": 0}

    def crashing(call):
        calls["n"] += 1
        # 8 + 8 greedy validation answers, 8 x 4 samples of the first trial, then 4 x 4 of
        # the second trial's first batch and at most 4 verdicts: the kill is in its second
        if calls["n"] > 8 + 8 + 32 + 16 + 4:
            raise KeyboardInterrupt("killed")
        return ticket_rule(call)

    with pytest.raises(KeyboardInterrupt):
        auto(task_dir, tmp_path, crashing, generation_batch=4)
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert stages["choose_icp-False_justify-vote"]["status"] == "done"
    assert "choose_icp-False_justify-model" not in stages
    first = (tmp_path / "run" / "choose_icp-False_justify-vote.jsonl").read_text()
    assert len((tmp_path / "run" / "choose_icp-False_justify-model.jsonl").read_text().splitlines()) == 4
    results, backend = auto(task_dir, tmp_path, ticket_rule, generation_batch=4)
    trials = [c for c in backend.calls_of("generate") if c["seed"] == 999 and c["n"] == 4]
    assert sum(c["n_prompts"] for c in trials) == 4 + 8 + 8  # the second's rest, the last two
    assert (tmp_path / "run" / "choose_icp-False_justify-vote.jsonl").read_text() == first
    assert [c["settings"] for c in results["recipe"]["candidates"]] == guard.MINING


def test_a_choice_departs_from_the_default_only_on_evidence():
    def answers(right):
        return {f"q{i}": bool(x) for i, x in enumerate(right)}
    one_more = answers([1] * 13), answers([1] * 12 + [0])  # fpb's case: 13/13 against 12/13
    assert not significantly_better(*one_more)
    five_to_none = answers([1] * 13), answers([1] * 8 + [0] * 5)
    assert significantly_better(*five_to_none) and not significantly_better(*five_to_none[::-1])
    assert not significantly_better(answers([1, 0] * 4), answers([0, 1] * 4))  # 4 wins, 4 losses
    assert not significantly_better(answers([1] * 5), answers([1] * 5))  # the same answers


def test_auto_mines_as_small_unless_another_way_is_significantly_more_often_right():
    def tried(settings, right):
        kept = {"kept": 6, "macro_f1": 1.0, "accuracy": 1.0}
        return {"settings": settings, "accuracy": sum(right) / len(right),
                "right": {f"q{i}": bool(x) for i, x in enumerate(right)},
                "per_class": kept, "global": kept}
    vote, model = {"icp": False, "justify": "vote"}, {"icp": False, "justify": "model"}
    icp = {"icp": True, "justify": "vote"}
    # fpb's seed 1: the model's settling got 11 of 13 right, the vote 10
    close = [tried(vote, [1] * 10 + [0] * 3), tried(model, [1] * 11 + [0] * 2)]
    assert choose(close) == {**vote, "per_class": True}
    clear = [tried(vote, [1] * 6 + [0] * 7), tried(model, [1] * 12 + [0]),
             tried(icp, [1] * 13)]  # both beat the vote 6 (7) to none: the most accurate wins
    assert choose(clear) == {**icp, "per_class": True}


def test_auto_without_a_validation_slice_is_the_small_recipe(task_dir, tmp_path):
    results, backend = auto(task_dir, tmp_path, ticket_rule, validation=0)
    assert "recipe" not in results and len(backend.calls_of("finetune")) == 2


def test_recipe_auto_from_python_and_the_command_line():
    from semievol.cli import _parser, _run_config

    config = RunConfig.recipe("auto", data="d", validation=12)
    assert config.auto_recipe and config.validation == 12 and config.per_class
    cli = _run_config(_parser().parse_args(["run", "--data", "d", "--recipe", "auto"]))
    assert cli == RunConfig.recipe("auto", data="d")


def test_a_killed_run_resumes_with_the_same_slice(task_dir, tmp_path):
    calls = {"n": 0}

    def crashing(call):
        calls["n"] += 1
        if calls["n"] > 40:  # after the validation scores, part-way through mining
            raise KeyboardInterrupt("killed")
        return ticket_rule(call)

    with pytest.raises(KeyboardInterrupt):
        world(task_dir, tmp_path, crashing, generation_batch=4)
    held = json.loads((tmp_path / "run" / "validation.json").read_text())
    results, backend = world(task_dir, tmp_path, ticket_rule, generation_batch=4)
    assert results["validation"]["ids"] == held and len(held) == 8
    assert [c["key"].rsplit("-", 1)[1] for c in backend.calls_of("finetune")] == ["r1"]


def test_guard_benchmark_re_decides_runs_and_measures_regret(task_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import guard as bench

    collapses = collapsing({ex.question for ex in load_task(task_dir).unlabeled})

    hurt, _ = world(task_dir, tmp_path / "hurt", collapses)
    helped, _ = world(task_dir, tmp_path / "helped", ticket_rule)
    world(task_dir, tmp_path / "unguarded", ticket_rule, validation=0)
    summary = bench.main([str(tmp_path / name / "run") for name in ("hurt", "helped", "unguarded")]
                         + ["--resamples", "200"])
    by_run = {r["group"]: r for r in summary["runs"]}
    assert set(by_run) == {"hurt", "helped"}  # no slice: nothing to decide
    assert by_run["hurt"]["decisions"]["evidence"] == 0 and by_run["helped"]["decisions"]["evidence"] == 1
    assert by_run["hurt"]["decisions"]["always SemiEvol"] == 1
    regret = by_run["hurt"]["regret"]["always SemiEvol"]
    assert regret == hurt["eval"]["sft"]["accuracy"] - hurt["eval"]["semievol"]["accuracy"] > 0
    assert summary["groups"]["all"]["mean_regret"]["evidence"] == 0.0
    assert by_run["hurt"]["power"]["evidence"] > 0.5 and by_run["helped"]["power"]["evidence"] < 0.05
    # the decision it re-makes is the one the run made
    assert [r["final"] for r in (hurt, helped)] == ["sft", "semievol"]
    # what the slice costs: the same sample without one (what --refit runs)
    unguarded, _ = world(task_dir, tmp_path / "off", ticket_rule, validation=0)
    cost = bench.main([str(tmp_path / "helped" / "run"), "--resamples", "10",
                       "--unguarded", str(tmp_path / "off" / "run")])["slice_cost"]
    assert cost == [{"sample": ["data", 40, 0], "final": helped["eval"]["semievol"]["accuracy"],
                     "sft": [helped["eval"]["sft"]["accuracy"], unguarded["eval"]["sft"]["accuracy"]],
                     "semievol": [helped["eval"]["semievol"]["accuracy"],
                                  unguarded["eval"]["semievol"]["accuracy"]],
                     "refit": unguarded["eval"]["semievol"]["accuracy"],
                     "refit_s": sum(unguarded["timings_s"].values()),
                     "run_s": sum(helped["timings_s"].values())}]


def _ex(answer="A"):
    return Example("q", "question", ("x", "y", "z"), answer)


def test_brier_from_samples():
    assert brier(["A"] * 16, _ex())["brier"] == 0 and brier(["B"] * 16, _ex())["brier"] == 2
    assert brier(["A"] * 8 + ["B"] * 8, _ex())["p_right"] == 0.5
    # unbiased: over many draws from p = (0.6, 0.3, 0.1) the mean is the true Brier score
    rng = random.Random(0)
    draws = [brier(rng.choices("ABC", (0.6, 0.3, 0.1), k=16), _ex())["brier"] for _ in range(4000)]
    truth = 0.4 ** 2 + 0.3 ** 2 + 0.1 ** 2
    assert abs(sum(draws) / len(draws) - truth) < 0.01
    assert brier(["A", None, None, "B"], _ex())["answers"] == {"None": 2, "A": 1, "B": 1}


def test_compare_sees_harm_a_tie_cannot_hide_and_no_harm_in_noise():
    def rows(briers):
        return [{"id": f"q{i}", "brier": b, "p_right": 1 - b / 2} for i, b in enumerate(briers)]

    sft = rows([0.1] * 13)
    collapsed = rows([1.9] * 5 + [0.0] * 8)  # five classes' questions lost, the rest surer
    harm = compare(collapsed, sft)
    assert harm["harm"] and harm["p_harm"] == 1 / 2 ** 5 and harm["interval"][0] > 0
    assert harm["brier"] == [sum(r["brier"] for r in collapsed) / 13, 0.1]
    better = compare(rows([0.05] * 12 + [0.3]), sft)  # surer nearly everywhere
    assert not better["harm"] and better["difference"] < 0 and better["interval"][1] > better["difference"]
    same = compare(sft, sft)
    assert same["p_harm"] == 1.0 and not same["harm"] and same["interval"] == [0.0, 0.0]
    slight = compare(rows([0.1] * 12 + [0.8]), sft)  # one question worse: not evidence
    assert not slight["harm"] and slight["interval"][0] <= 0 <= slight["interval"][1]
    many = compare(rows([0.2] * 60), rows([0.1] * 60))  # 60 questions: random sign flips
    assert many["harm"] and many["n"] == 60
