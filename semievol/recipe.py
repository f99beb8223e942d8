"""Recipe 'auto': the mining settings (retrieved examples or not, how disagreements are
settled, global or per-class selection) and labeled replay, chosen on the validation slice
rather than fixed in advance (see guard.py for the slice, guard.MINING for the candidates).

Choosing runs the ordinary stages under their own names (:class:`~semievol.types.Trial`:
``retrieve_choose``, ``choose_<settings>``), so a killed choice resumes as a round does,
and is recorded in ``recipe.json``; results.json's ``recipe`` says what it chose and cost.
"""
from __future__ import annotations

import dataclasses

from . import guard
from .config import RunConfig
from .rundir import RunDir
from .stages import Stages
from .types import Example, Round, Trial, validation_stage

FILE = "recipe.json"


def choose(stages: Stages, warm: str, train: list[Example], held: list[Example]) -> RunConfig:
    """Mine the validation questions (answers hidden) with the warm model under each of
    guard.MINING's settings, judge the pseudo-labels by the answers, and return the run's
    configuration with the best settings (guard.choose)."""
    c = stages.config

    def compute() -> dict:
        questions = [dataclasses.replace(ex, answer=None) for ex in held]
        tried = []
        for settings in guard.MINING if c.cl else [{"icp": False}, {"icp": True}]:
            if settings["icp"] and c.k == 0:
                continue
            trial = Trial(tuple(settings.items()))
            shots = stages.retrieve(trial, train, questions) if settings["icp"] else {}
            records = stages.collaborate(trial, warm, questions, shots, c.replace(**settings),
                                         quiet=True)
            tried.append({"settings": settings, **guard.judge(records, held, c.theta)})
        chosen = guard.choose(tried)
        stages.rd.write_json(FILE, {"chosen": chosen, "candidates": tried})
        return chosen

    stages.rd.once("choose_recipe", compute, timed=False)
    return c.replace(**stages.rd.read_json(FILE)["chosen"])


def replay_or_not(config: RunConfig, stages: Stages, r: Round, start: str,
                  train: list[Example], pairs: list[tuple[Example, str]],
                  held: list[Example]) -> tuple[RunConfig, str]:
    """The first round's evolve, with the labeled examples replayed and without: replay
    (the small recipe's) is kept unless evolving without it is significantly better on the
    validation slice (guard.significantly_better: on fpb one question of 13 chose
    'without' and cost 6.5 points on test). Returns the configuration the later rounds
    run with (the choice holds for them) and the evolved model."""
    replayed = stages.evolve(r.of("replay"), start, [(ex, ex.answer) for ex in train] + pairs)
    alone = stages.evolve(r.of("alone"), start, pairs)
    stages.validate(r.of("replay"), replayed, held)
    stages.validate(r.of("alone"), alone, held)
    replay = not guard.significantly_better(stages.validation_answers(alone),
                                            stages.validation_answers(replayed))
    saved = stages.rd.read_json(FILE)
    if saved["chosen"].get("replay_labeled") != replay:
        saved["chosen"]["replay_labeled"] = replay
        stages.rd.write_json(FILE, saved)
    return config.replace(replay_labeled=replay), replayed if replay else alone


def report(rd: RunDir) -> dict:
    """results.json's ``recipe``: what 'auto' chose, what each candidate scored, and what
    choosing cost over a fixed recipe: the trials' stages, the evolve that was not kept
    and the validation scores of both evolves (seconds)."""
    saved, timings = rd.read_json(FILE), rd.manifest["timings_s"]
    first = Round(1)
    unkept = first.of("alone" if saved["chosen"].get("replay_labeled", True) else "replay")
    extra = [name for name in timings
             if name.startswith("choose_") or name in (Trial.retrieve, unkept.evolve)
             or name in (validation_stage(first.of("replay")), validation_stage(first.of("alone")))]
    return {"name": "auto", **saved, "cost_s": round(sum(timings[n] for n in extra), 3),
            "cost_stages": extra}
