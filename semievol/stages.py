"""The pipeline's stages, each only its computation: what it computes, what it writes to
the run directory and what it reads back. ``RunDir.once`` skips a stage already done, so a
run resumes without doing any stage (or any finished item of one) twice. Each is named by
what it belongs to: a round (``types.Round``: ``collaborate_r1``), a model (``eval_sft``),
or recipe 'auto''s trials (``types.Trial``, see recipe.py)."""
from __future__ import annotations

import logging
from collections.abc import Iterable

from . import collaborate, evaluate, evolve, guard, propagate, selection, track
from .backends import Backend
from .collaborate import Mined
from .config import RunConfig
from .evaluate import Prediction
from .rundir import RunDir
from .types import Baseline, Example, PseudoLabel, Round, Trial, Usage, validation_stage

log = logging.getLogger("semievol")


class Stages:
    """The stages, each only its computation: ``RunDir.once`` persists it in the run
    directory and skips it when already done."""

    def __init__(self, config: RunConfig, backend: Backend, rd: RunDir, quiet: bool,
                 tracking: track.Tracking):
        self.config, self.backend, self.rd, self.quiet = config, backend, rd, quiet
        self.tracking = tracking
        self.style = config.prompt_style
        self.scored: dict[str, dict] = {}  # model -> its validation score, each scored once
        self.scored_as: dict[str, str] = {}  # model -> the file of its validation answers

    def persist(self, name: str):
        """What an item-wise stage does with each finished batch: count the tokens (and
        dollars) it used, then append its records. A kill between the two has the batch
        made and counted again (it was paid for twice), so no spending goes uncounted (and
        a resumed ``--max-cost-usd`` sees it all)."""
        def write(records: list[Mined] | list[Prediction], usage: Usage) -> None:
            self.rd.add_usage(name, usage)
            self.rd.append(name, [rec.to_json() for rec in records])
        return write

    def hold_out(self, labeled: list[Example]) -> tuple[list[Example], list[Example]]:
        """(train, validation): the validation slice (see guard.py), chosen once and kept
        in validation.json. A run directory made before the guard existed (stages done,
        no slice recorded) resumes without one: its warm-up saw every label."""
        def compute() -> dict:
            older = bool(self.rd.manifest["stages"]) or any(self.rd.path.glob("*.jsonl"))
            n = 0 if older else guard.size(self.config.validation, len(labeled))
            _, held = guard.split(labeled, n, self.config.seed)
            self.rd.write_json("validation.json", [ex.id for ex in held])
            return {"examples": len(held)}

        ids = set(self.rd.once("validation", compute, lambda: self.rd.read_json("validation.json"),
                               timed=False))
        return [ex for ex in labeled if ex.id not in ids], [ex for ex in labeled if ex.id in ids]

    def warm_up(self, base: str, labeled: list[Example]) -> str:
        def compute() -> dict:
            model = propagate.warm_up(self.backend, base, labeled, self.config.finetune,
                                      style=self.style, key=f"{self.rd.run_id}-warmup")
            return {"usage": model.usage, "model": model, "examples": len(labeled),
                    "losses": model.losses}
        return self._trained("warmup", compute)

    def evolve(self, r: Round, start: str, pairs: list[tuple[Example, str]]) -> str:
        enough = len(pairs) >= self.backend.min_finetune_examples

        def compute() -> dict:
            if not enough:
                log.warning("round %s selected %d examples, too few to fine-tune: "
                            "the evolved model stays %s", r, len(pairs), start)
                return {"usage": None, "model": start, "examples": len(pairs), "losses": []}
            model = evolve.evolve(self.backend, start, pairs, self.config.evolve_ft,
                                  style=self.style, key=f"{self.rd.run_id}-evolve-{r}")
            return {"usage": model.usage, "model": model, "examples": len(pairs),
                    "losses": model.losses}
        return self._trained(r.evolve, compute, timed=enough)

    def _trained(self, name: str, compute, timed: bool = True) -> str:
        """A fine-tuning stage's model (its loss curve to the trackers)."""
        info = self.rd.once(name, compute, timed=timed)
        self.tracking.curve(name, info.get("losses"))
        return info["model"]

    def retrieve(self, label: Round | Trial, pool: list[Example],
                 items: list[Example]) -> dict[str, list[Example]]:
        """Each item's ``k`` nearest examples of the pool, to show it solved (ICP)."""
        name = label.retrieve

        def compute() -> dict:
            neighbours, usage = propagate.retrieve(self.backend, pool, items, self.config.k)
            self.rd.write_json(f"{name}.json", neighbours)
            return {"usage": usage}

        near = self.rd.once(name, compute, lambda: self.rd.read_json(f"{name}.json"))
        by_id = {ex.id: ex for ex in pool}
        return {uid: [by_id[i] for i in ids] for uid, ids in near.items()}

    def collaborate(self, label: Round | Trial, model: str, items: list[Example],
                    shots: dict[str, list[Example]], c: RunConfig,
                    quiet: bool | None = None) -> list[PseudoLabel]:
        """Pseudo-label ``items`` with ``model`` under ``c``'s mining settings."""
        name = label.collaborate

        def compute() -> None:
            finished = {rec["id"] for rec in self.rd.stream(name)}
            todo = [ex for ex in items if ex.id not in finished]
            views = collaborate.make_views(c.n if c.cl else 1, c.temperature, icp=c.icp,
                                           kind=c.views)
            collaborate.mine(self.backend, model, todo, shots, views, style=self.style,
                             max_tokens=c.max_tokens, seed=c.seed + label.seed_offset,
                             batch_size=c.generation_batch, justify=c.justify if c.cl else None,
                             on_records=self.persist(name),
                             quiet=self.quiet if quiet is None else quiet)

        self.rd.once(name, compute)
        return _unique(PseudoLabel.of(rec) for rec in self.rd.stream(name))

    def select(self, r: Round, records: list[PseudoLabel],
               c: RunConfig) -> tuple[list[PseudoLabel], float | None]:
        """The selected records and the entropy threshold (None: no threshold applied)."""
        name = r.selection

        def compute() -> dict:
            chosen, tau = selection.select(records, c.theta, adaptive=c.adaptive_selection,
                                           per_class=c.per_class)
            tau = tau if tau != float("inf") else None
            self.rd.write_json(f"{name}.json", {"threshold": tau,
                                                "selected": [rec.id for rec in chosen]})
            return {"selected": len(chosen), "threshold": tau}

        saved = self.rd.once(name, compute, lambda: self.rd.read_json(f"{name}.json"), timed=False)
        keep = set(saved["selected"])
        return [rec for rec in records if rec.id in keep], saved["threshold"]

    def evaluate(self, label: str, model: str, test: list[Example]) -> dict:
        """``model``'s test scores (``label``: vanilla, sft, semievol or final)."""
        return self._score(f"eval_{label}", model, test, f"test/{label}")

    def validate(self, label: Baseline | Round, model: str, held: list[Example]) -> dict:
        """A model's score on the validation slice (persisted as ``eval_validation_<label>``
        the first time that model is scored)."""
        if model not in self.scored:
            self.scored_as[model] = validation_stage(label)
            self.scored[model] = self._score(self.scored_as[model], model, held,
                                             f"validation/{label}")
        return self.scored[model]

    def _score(self, name: str, model: str, examples: list[Example], tracked_as: str) -> dict:
        """``model``'s answers to ``examples``, scored (stage ``name``: eval_...)."""
        def compute() -> None:
            finished = {rec["id"] for rec in self.rd.stream(name)}
            evaluate.predict(self.backend, model, [ex for ex in examples if ex.id not in finished],
                             style=self.style, max_tokens=self.config.max_tokens,
                             batch_size=self.config.generation_batch, desc=name.replace("_", " ", 1),
                             on_records=self.persist(name), quiet=self.quiet)

        self.rd.once(name, compute, model=model)
        scores = evaluate.metrics(_unique(Prediction(**rec) for rec in self.rd.stream(name)),
                                  examples)
        self.tracking.scores(tracked_as, scores, model)
        return scores

    def evidence(self, label: str, model: str, held: list[Example]) -> list[dict]:
        """How much probability ``model`` puts on each validation question's answers
        (guard.sample), persisted as ``evidence_<label>`` the first time it is asked."""
        name = f"evidence_{label}"

        def compute() -> dict:
            records, usage = guard.sample(self.backend, model, held, style=self.style,
                                          max_tokens=self.config.max_tokens,
                                          seed=self.config.seed + 77,
                                          batch_size=self.config.generation_batch)
            self.rd.write_records(name, records)
            return {"usage": usage}
        return self.rd.once(name, compute, lambda: self.rd.records(name), model=model)

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


def _unique(records: Iterable) -> list:
    """One record per id (the first), in case a resumed batch was written twice."""
    seen, out = set(), []
    for rec in records:
        if rec.id not in seen:
            seen.add(rec.id)
            out.append(rec)
    return out
