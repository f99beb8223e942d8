"""The SemiEvol pipeline, top to bottom as in the paper: propagate (in weight and in
context), collaborate, select, evolve; then evaluate vanilla, SFT and SemiEvol.

Every stage records its output in the run directory as it finishes, so running again on
the same directory resumes: done stages are skipped, item-wise stages continue after their
last finished item, and fine-tunes are keyed so none is trained (or paid for) twice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from . import collaborate, evaluate, evolve, guard, propagate, selection, track
from .backends import Backend
from .config import EXTENDABLE, RESUMABLE, RunConfig
from .data import SPLITS, fingerprint, load_task
from .errors import ConfigError
from .rundir import RunDir
from .collaborate import Mined
from .evaluate import Prediction
from .types import Example, PseudoLabel, Task, Usage

log = logging.getLogger("semievol")


def run(config: RunConfig, backend: Backend, run_dir: str | Path, *, task: Task | None = None,
        quiet: bool = False, report_to: Sequence[str] = ()) -> dict:
    """Run (or resume) SemiEvol; return the results also written to results.json.
    ``report_to``: experiment trackers to log to as well (see track.py)."""
    rd = RunDir(run_dir)
    task = task or load_task(config.data, limits=limits(config), columns=config.columns)
    _check_config(rd, config, task)
    tracking = track.Tracking([track.make(name) for name in report_to], rd.path,
                              f"{task.name}-{rd.run_id}")
    try:
        results = _run(config, backend, rd, task, _Run(config, backend, rd, quiet, tracking))
    except BaseException:
        tracking.finish(failed=True)  # a resume reopens the same tracking run
        raise
    tracking.finish()
    return results


def _run(config: RunConfig, backend: Backend, rd: RunDir, task: Task, stages: "_Run") -> dict:
    quiet = stages.quiet
    stages.tracking.params(config.to_dict())
    base = config.model or backend.default_model

    train, held = stages.hold_out(task.labeled)  # the validation slice: decisions only
    warm = stages.warm_up(base, train) if config.iwp else base
    fallback = "sft" if config.iwp else "vanilla"  # what the run returns if evolving does not help
    checked = {"vanilla": stages.validate("vanilla", base, held)} if held else {}
    if held and config.iwp:
        checked["sft"] = stages.validate("sft", warm, held)
    if config.auto_recipe and held:  # recipe 'auto': settings chosen on the validation slice
        config = stages.choose_recipe(warm, train, held)
    pool, remaining, miner, evolved = list(train), list(task.unlabeled), warm, warm
    rounds, mined, selected, made = [], [], set(), {fallback: warm}
    kept, verdicts = fallback, []  # the model each round must not be shown worse than
    for r in range(1, config.rounds + 1):
        if not remaining:
            break
        shots = stages.retrieve(r, pool, remaining)
        records = stages.collaborate(r, miner, remaining, shots)
        chosen, tau = stages.select(r, records)
        by_id = {ex.id: ex for ex in remaining}
        pairs = [(by_id[rec.id], rec.pseudo_label) for rec in chosen]
        # w/o IWP there is one fine-tune, of the base on D_L + D_selected
        replay = config.replay_labeled or (not config.iwp and r == 1)
        labeled = [(ex, ex.answer) for ex in train] if replay else []
        if config.auto_recipe and held and r == 1:
            evolved = stages.evolve_replay_or_not(r, miner, train, pairs, held)
            config = stages.config
        else:
            evolved = stages.evolve(r, miner, labeled + pairs)
        made[f"r{r}"] = evolved
        rounds.append({"round": r, "mined": len(records), "selected": len(chosen),
                       "consistent": sum(rec.consistent for rec in records),
                       "justified": sum(rec.justified for rec in records),
                       "threshold": tau, "model": evolved})
        chosen_ids = {rec.id for rec in chosen}
        mined += records
        selected |= chosen_ids
        pool += [dataclasses.replace(ex, answer=label) for ex, label in pairs
                 if ex.id in chosen_ids]
        remaining = [ex for ex in remaining if ex.id not in chosen_ids]
        miner = evolved
        if held:
            checked[f"r{r}"] = stages.validate(f"r{r}", evolved, held)
            rounds[-1]["validation"] = checked[f"r{r}"]["accuracy"]
            verdicts.append(stages.verdict(f"r{r}", kept, made, held))
            if verdicts[-1]["harm"]:
                break  # evidence that this round made the model worse: keep the one before
            kept = f"r{r}"

    winner = kept if held else f"r{len(rounds)}"
    final = "semievol" if winner.startswith("r") else fallback
    models = {"base": base, "warm": warm if config.iwp else None, "evolved": evolved,
              "final": made.get(winner, evolved)}
    scores = {"vanilla": stages.evaluate("vanilla", base, task.test)}
    scores["sft"] = stages.evaluate("sft", warm, task.test) if config.iwp else None
    scores["semievol"] = stages.evaluate("semievol", evolved, task.test)
    same = {base: "vanilla", warm: fallback, evolved: "semievol"}.get(models["final"])
    scores["final"] = dict(scores[same]) if same else stages.evaluate("final", models["final"], task.test)
    refit = config.refit and held and made[winner] != base
    if refit:
        models["final"], scores["final"], refit = _refit(config, backend, rd, task, final, quiet)
    results = _results(config, backend, rd, task, models, scores, rounds, mined, selected)
    results.update(validation=stages.validation(held, checked, made, winner, verdicts),
                   final=final, **({"refit": refit} if refit else {}))
    if config.auto_recipe and held:
        results["recipe"] = guard.recipe_report(rd.read_json("recipe.json"), rd.manifest["timings_s"])
    rd.write_json("results.json", results)
    if stages.tracking.live:
        stages.tracking.report(rd.path)
        stages.tracking.results(results, [rd.path / name for name in
                                          ("results.json", "config.json", "report.md")]
                                + sorted(rd.path.glob("*.png")))
    return results


def _refit(config: RunConfig, backend: Backend, rd: RunDir, task: Task, final: str,
           quiet: bool) -> tuple[str, dict, dict]:
    """The model the guard chose, made again on every label (scikit-learn's ``refit``): a
    run without a slice in ``RUN_DIR/refit`` (without mining where the guard kept the
    warm-up). Returns its model, its test scores, and what results.json says of it."""
    evolve = final == "semievol"
    sub = run(config.replace(validation=0, refit=False), backend, rd.path / "refit",
              task=task if evolve else dataclasses.replace(task, unlabeled=[]), quiet=quiet)
    label = "semievol" if evolve else "sft"
    return (sub["models"]["evolved" if evolve else "warm"], dict(sub["eval"][label]),
            {"dir": "refit", "model": label, "labeled": len(task.labeled),
             "timings_s": sub["timings_s"], "usage": sub["usage"]})


class _Run:
    """The stages, each persisted in the run directory and skipped when already done."""

    def __init__(self, config: RunConfig, backend: Backend, rd: RunDir, quiet: bool,
                 tracking: track.Tracking):
        self.config, self.backend, self.rd, self.quiet = config, backend, rd, quiet
        self.tracking = tracking
        self.style = config.prompt_style
        self.scored: dict[str, dict] = {}  # model -> its validation score, each scored once
        self.scored_as: dict[str, str] = {}  # model -> the file of its validation answers

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage."""
        start = time.perf_counter()
        log.info("stage %s", name)
        try:
            yield
        finally:
            self.rd.add_time(name, time.perf_counter() - start)

    def persist(self, name: str, records: list[Mined] | list[Prediction], usage: Usage) -> None:
        """Count the tokens (and dollars) a finished batch used, then append its records: a
        kill between the two has the batch made and counted again (it was paid for twice),
        so no spending goes uncounted (and a resumed ``--max-cost-usd`` sees it all)."""
        self.rd.add_usage(name, usage)
        self.rd.append(name, [rec.to_json() for rec in records])

    def hold_out(self, labeled: list[Example]) -> tuple[list[Example], list[Example]]:
        """(train, validation): the validation slice (see guard.py), chosen once and kept
        in validation.json. A run directory made before the guard existed (stages done,
        no slice recorded) resumes without one: its warm-up saw every label."""
        if not self.rd.done("validation"):
            older = bool(self.rd.manifest["stages"]) or any(self.rd.path.glob("*.jsonl"))
            n = 0 if older else guard.size(self.config.validation, len(labeled))
            _, held = guard.split(labeled, n, self.config.seed)
            self.rd.write_json("validation.json", [ex.id for ex in held])
            self.rd.finish("validation", examples=len(held))
        ids = set(self.rd.read_json("validation.json"))
        return [ex for ex in labeled if ex.id not in ids], [ex for ex in labeled if ex.id in ids]

    def validate(self, label: str, model: str, held: list[Example]) -> dict:
        """A model's score on the validation slice (persisted as ``eval_validation_<label>``
        the first time that model is scored)."""
        if model not in self.scored:
            self.scored[model] = self.evaluate(f"validation_{label}", model, held)
            self.scored_as[model] = f"eval_validation_{label}"
        return self.scored[model]

    def evidence(self, label: str, model: str, held: list[Example]) -> list[dict]:
        """How much probability ``model`` puts on each validation question's answers
        (guard.sample), persisted as ``evidence_<label>`` the first time it is asked."""
        name = f"evidence_{label}"
        if self.rd.stage_info(name).get("model", model) != model or not self.rd.done(name):
            self.rd.restart(name)  # unfinished, or of another model: sampled again
            with self.stage(name):
                records, usage = guard.sample(self.backend, model, held, style=self.style,
                                              max_tokens=self.config.max_tokens,
                                              seed=self.config.seed + 77,
                                              batch_size=self.config.generation_batch)
            self.rd.append(name, records)
            self.rd.finish(name, usage=usage, model=model)
        return self.rd.records(name)

    def verdict(self, candidate: str, incumbent: str, made: dict[str, str],
                held: list[Example]) -> dict:
        """The guard's comparison of two models' evidence on the slice."""
        return {"candidate": candidate, "incumbent": incumbent,
                **guard.compare(self.evidence(candidate, made[candidate], held),
                                self.evidence(incumbent, made[incumbent], held))}

    def validation(self, held: list[Example], checked: dict, made: dict[str, str],
                   winner: str, verdicts: list[dict]) -> dict:
        """results.json's ``validation``: the slice, each model's scores on it (with its mean
        probability of the right answer and Brier score), the guard's comparisons and the
        evidence question by question."""
        evidence = {label: self.evidence(label, made[label], held) for label in made} if held else {}
        for label, records in evidence.items():
            checked[label].update(p_right=sum(r["p_right"] for r in records) / len(records),
                                  brier=sum(r["brier"] for r in records) / len(records))
        return {"n": len(held), "ids": [ex.id for ex in held], "scores": checked,
                "chosen": winner if held else None, "samples": guard.SAMPLES,
                "comparisons": verdicts, "evidence": evidence}

    def validation_answers(self, model: str) -> dict[str, bool]:
        """Which validation questions a scored model got right."""
        return {rec["id"]: rec["correct"] for rec in self.rd.stream(self.scored_as[model])}

    def choose_recipe(self, warm: str, train: list[Example], held: list[Example]) -> RunConfig:
        """Recipe 'auto': mine the validation questions (answers hidden) with the warm model
        under each of guard.MINING's settings, judge the pseudo-labels by their answers,
        and take the best settings (guard.choose) for the rest of the run."""
        c = self.config
        if not self.rd.done("choose_recipe"):
            tried, questions = [], [dataclasses.replace(ex, answer=None) for ex in held]
            by_id = {ex.id: ex for ex in train}
            for settings in guard.MINING if c.cl else [{"icp": False}, {"icp": True}]:
                if settings["icp"] and c.k == 0:
                    continue
                name = "choose_" + "_".join(f"{k}-{v}" for k, v in settings.items())
                records: list[Mined] = []
                with self.stage(name):
                    near, used = propagate.retrieve(self.backend, train, questions, c.k) \
                        if settings["icp"] else ({}, Usage())
                    shots = {uid: [by_id[i] for i in ids] for uid, ids in near.items()}

                    def keep(batch: list[Mined], usage: Usage) -> None:
                        nonlocal used
                        records.extend(batch)
                        used += usage

                    collaborate.mine(self.backend, warm, questions, shots,
                                     collaborate.make_views(c.n if c.cl else 1, c.temperature,
                                                            icp=settings["icp"], kind=c.views),
                                     style=self.style, max_tokens=c.max_tokens, seed=c.seed + 999,
                                     batch_size=c.generation_batch,
                                     justify=settings.get("justify"), on_records=keep, quiet=True)
                self.rd.add_usage(name, used)
                labels = [PseudoLabel.of(rec.to_json()) for rec in records]
                tried.append({"settings": settings, **guard.judge(labels, held, c.theta)})
            chosen = guard.choose(tried)
            self.rd.write_json("recipe.json", {"chosen": chosen, "candidates": tried})
            self.rd.finish("choose_recipe", **chosen)
        self.config = c.replace(**self.rd.read_json("recipe.json")["chosen"])
        return self.config

    def evolve_replay_or_not(self, r: int, start: str, train: list[Example],
                             pairs: list[tuple[Example, str]], held: list[Example]) -> str:
        """Recipe 'auto', first round: evolve with the labeled examples replayed and
        without; replay (the small recipe's) is kept unless evolving without it is
        significantly better on the validation slice (guard.significantly_better: on fpb
        one question of 13 chose 'without' and cost 6.5 points on test). The choice holds
        for later rounds."""
        replayed = self.evolve(f"{r}_replay", start, [(ex, ex.answer) for ex in train] + pairs)
        alone = self.evolve(f"{r}_alone", start, pairs)
        self.validate(f"r{r}_replay", replayed, held)
        self.validate(f"r{r}_alone", alone, held)
        replay = not guard.significantly_better(self.validation_answers(alone),
                                                self.validation_answers(replayed))
        saved = self.rd.read_json("recipe.json")
        if saved["chosen"].get("replay_labeled") != replay:
            saved["chosen"]["replay_labeled"] = replay
            self.rd.write_json("recipe.json", saved)
        self.config = self.config.replace(replay_labeled=replay)
        return replayed if replay else alone

    def warm_up(self, base: str, labeled: list[Example]) -> str:
        if not self.rd.done("warmup"):
            with self.stage("warmup"):
                model = propagate.warm_up(self.backend, base, labeled, self.config.finetune,
                                          style=self.style, key=f"{self.rd.run_id}-warmup")
            self.rd.finish("warmup", usage=model.usage, model=model, examples=len(labeled),
                           losses=model.losses)
        self.tracking.curve("warmup", self.rd.stage_info("warmup").get("losses"))
        return self.rd.stage_info("warmup")["model"]

    def retrieve(self, r: int, pool: list[Example], items: list[Example]) -> dict[str, list[Example]]:
        if not self.config.icp or self.config.k == 0:
            return {}
        name = f"retrieve_r{r}"
        if not self.rd.done(name):
            with self.stage(name):
                neighbours, usage = propagate.retrieve(self.backend, pool, items, self.config.k)
            self.rd.write_json(f"{name}.json", neighbours)
            self.rd.finish(name, usage=usage)
        by_id = {ex.id: ex for ex in pool}
        return {uid: [by_id[i] for i in ids] for uid, ids in self.rd.read_json(f"{name}.json").items()}

    def collaborate(self, r: int, model: str, items: list[Example],
                    shots: dict[str, list[Example]]) -> list[PseudoLabel]:
        name, c = f"collaborate_r{r}", self.config
        if not self.rd.done(name):
            finished = {rec["id"] for rec in self.rd.stream(name)}
            todo = [ex for ex in items if ex.id not in finished]
            views = collaborate.make_views(c.n if c.cl else 1, c.temperature, icp=c.icp,
                                           kind=c.views)
            with self.stage(name):
                collaborate.mine(self.backend, model, todo, shots, views, style=self.style,
                                 max_tokens=c.max_tokens, seed=c.seed + 1000 * r,
                                 batch_size=c.generation_batch,
                                 justify=c.justify if c.cl else None,
                                 on_records=lambda recs, usage: self.persist(name, recs, usage),
                                 quiet=self.quiet)
            self.rd.finish(name)
        return _unique(PseudoLabel.of(rec) for rec in self.rd.stream(name))

    def select(self, r: int, records: list[PseudoLabel]) -> tuple[list[PseudoLabel], float | None]:
        """The selected records and the entropy threshold (None: no threshold applied)."""
        name = f"selection_r{r}"
        if self.rd.done(name):
            saved = self.rd.read_json(f"{name}.json")
            keep = set(saved["selected"])
            return [rec for rec in records if rec.id in keep], saved["threshold"]
        chosen, tau = selection.select(records, self.config.theta,
                                       adaptive=self.config.adaptive_selection,
                                       per_class=self.config.per_class)
        tau = tau if tau != float("inf") else None
        self.rd.write_json(f"{name}.json", {"threshold": tau,
                                            "selected": [rec.id for rec in chosen]})
        self.rd.finish(name, selected=len(chosen), threshold=tau)
        return chosen, tau

    def evolve(self, r: int, start: str, pairs: list[tuple[Example, str]]) -> str:
        name = f"evolve_r{r}"
        if not self.rd.done(name):
            if len(pairs) < self.backend.min_finetune_examples:
                log.warning("round %s selected %d examples, too few to fine-tune: "
                            "the evolved model stays %s", r, len(pairs), start)
                model, usage, losses = start, None, []
            else:
                with self.stage(name):
                    model = evolve.evolve(self.backend, start, pairs, self.config.evolve_ft,
                                          style=self.style, key=f"{self.rd.run_id}-evolve-r{r}")
                usage, losses = model.usage, model.losses
            self.rd.finish(name, usage=usage, model=model, examples=len(pairs), losses=losses)
        self.tracking.curve(name, self.rd.stage_info(name).get("losses"))
        return self.rd.stage_info(name)["model"]

    def evaluate(self, label: str, model: str, test: list[Example]) -> dict:
        name = f"eval_{label}"
        if self.rd.stage_info(name).get("model", model) != model:
            self.rd.restart(name)  # it scored another model: the run had other rounds then
        if not self.rd.done(name):
            self.rd.begin(name, model=model)
            finished = {rec["id"] for rec in self.rd.stream(name)}
            todo = [ex for ex in test if ex.id not in finished]
            with self.stage(name):
                evaluate.predict(self.backend, model, todo, style=self.style,
                                 max_tokens=self.config.max_tokens,
                                 batch_size=self.config.generation_batch, desc=f"eval {label}",
                                 on_records=lambda recs, usage: self.persist(name, recs, usage),
                                 quiet=self.quiet)
            self.rd.finish(name, model=model)
        scores = evaluate.metrics(_unique(Prediction(**rec) for rec in self.rd.stream(name)), test)
        kind, _, rest = label.partition("_")  # validation_sft -> validation/sft
        self.tracking.scores(f"validation/{rest}" if kind == "validation" else f"test/{label}",
                             scores, model)
        return scores


def _results(config, backend, rd: RunDir, task: Task, models, scores, rounds,
             mined: list[PseudoLabel], selected: set[str]) -> dict:
    vanilla = scores["vanilla"]["accuracy"]
    for row in scores.values():
        if row is not None:
            row["error_reduction"] = evaluate.error_reduction(row["accuracy"], vanilla)
    accuracy = _pseudo_label_report(rd, task, mined, selected)
    return {
        "run_id": rd.run_id, "task": task.name, "backend": backend.name,
        "base_model": models["base"], "models": models, "eval": scores,
        "unlabeled": {"total": len(task.unlabeled),
                      "consistent": sum(r["consistent"] for r in rounds),
                      "justified": sum(r["justified"] for r in rounds),
                      "selected": len(selected), "pseudo_label_accuracy": accuracy},
        "rounds": rounds,
        "sizes": {"labeled": len(task.labeled), "unlabeled": len(task.unlabeled),
                  "test": len(task.test)},
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "trained_tokens": 0,
                  "cost_usd": None, **rd.manifest["usage"]},
        "usage_by_stage": dict(rd.manifest["usage_by_stage"]),
        "timings_s": dict(rd.manifest["timings_s"]),
        "runtime": backend.runtime(),
        "config": config.to_dict(),
    }


def _pseudo_label_report(rd: RunDir, task: Task, mined: list[PseudoLabel],
                         selected: set[str]) -> dict:
    """Pseudo-label accuracy of all and of selected pseudo-labels, from the hidden answers.
    This is the only place that reads ``task.hidden``, after the algorithm has finished."""
    if not task.hidden:
        return {"all": None, "selected": None}
    from .answers import is_correct

    by_id = {ex.id: ex for ex in task.unlabeled}
    rows = [{"id": rec.id, "entropy": rec.entropy, "justified": rec.justified,
             "selected": rec.id in selected, "pseudo_label": rec.pseudo_label,
             "correct": is_correct(rec.pseudo_label, by_id[rec.id], task.hidden.get(rec.id))}
            for rec in mined if rec.id in task.hidden]
    rd.write_json("pseudo_labels.json", rows)

    def acc(subset):
        return sum(r["correct"] for r in subset) / len(subset) if subset else None

    return {"all": acc([r for r in rows if r["pseudo_label"] is not None]),
            "selected": acc([r for r in rows if r["selected"]])}


def _unique(records: Iterable) -> list:
    """One record per id (the first), in case a resumed batch was written twice."""
    seen, out = set(), []
    for rec in records:
        if rec.id not in seen:
            seen.add(rec.id)
            out.append(rec)
    return out


def spent_usd(run_dir: str | Path) -> float:
    """Dollars a run directory's earlier part spent (0 for a new run): what a hosted
    backend's budget must count when the run resumes (its ``spent_usd``)."""
    manifest = Path(run_dir) / "manifest.json"
    if not manifest.exists():
        return 0.0
    return json.loads(manifest.read_text())["usage"].get("cost_usd") or 0.0


def limits(config: RunConfig) -> dict:
    return {"labeled": config.limit_labeled, "unlabeled": config.limit_unlabeled,
            "test": config.limit_test}


def _check_config(rd: RunDir, config: RunConfig, task: Task) -> None:
    """A run directory belongs to one configuration and one data: resuming with another is
    refused, except for the options that cannot change results (``RESUMABLE``: the budget,
    batch sizes) and the number of rounds (``EXTENDABLE``: given more, a finished run goes
    on from its last round; given fewer, it reports those), which take their new values. A
    field added to RunConfig after the run was made reads as its default, so a newer
    semievol resumes an older run. The data is compared by content (the manifest's
    ``data``: each split's fingerprint), not by path; config.json is written only when it
    changes, so a finished run resumes on a read-only directory."""
    path = rd.path / "config.json"
    saved = RunConfig.load(path) if path.exists() else None
    data = fingerprint(task)
    _check_data(rd, data, moved=saved is not None and
                Path(saved.data).resolve() != Path(config.data).resolve())
    if saved is not None:
        config = config.replace(data=saved.data)  # the path it was made with; same content
        changed = sorted(k for k, v in config.to_dict().items()
                         if k not in RESUMABLE | EXTENDABLE and saved.to_dict()[k] != v)
        if changed:
            raise ConfigError(f"{rd.path} was made with a different configuration "
                              f"({', '.join(changed)} differ): resume it with the same "
                              "options, or choose a new --out")
    if "data" not in rd.manifest:
        rd.manifest["data"] = data
        rd.save()
    if config != saved:
        config.save(path)


def _check_data(rd: RunDir, now: dict, *, moved: bool) -> None:
    """Refuse a resume on data whose content changed (``now``: its fingerprint), naming
    the splits that did. A run made before fingerprints were kept is resumed only from the
    same directory, and takes its fingerprint then."""
    then = rd.manifest.get("data")
    if then is None:
        if moved:
            raise ConfigError(f"{rd.path} was made on other --data: resume it with the "
                              "same data, or choose a new --out")
        return
    changed = [f"{split} ({then[split]['rows']} rows then, {now[split]['rows']} now"
               + (")" if then[split]["rows"] != now[split]["rows"] else ", other content)")
               for split in SPLITS if then.get(split) != now[split]]
    if changed:
        raise ConfigError(f"{rd.path} was made on other data: the {'; '.join(changed)} "
                          "changed since. Its stages hold answers to the data it was made on: "
                          "run on that data, or choose a new --out for this one")
