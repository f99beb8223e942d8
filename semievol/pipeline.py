"""The SemiEvol pipeline, top to bottom as in the paper: propagate (in weight and in
context), collaborate, select, evolve; then evaluate vanilla, SFT and SemiEvol.

Every stage records its output in the run directory as it finishes, so running again on
the same directory resumes: done stages are skipped, item-wise stages continue after their
last finished item, and fine-tunes are keyed so none is trained (or paid for) twice. That is
``RunDir.once``'s work; each stage (stages.py) is only its computation, named by the round
it belongs to (``types.Round``). Recipe 'auto' (recipe.py) runs the same stages.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from . import evaluate, recipe, track
from .backends import Backend
from .config import EXTENDABLE, RESUMABLE, RunConfig
from .data import SPLITS, fingerprint, load_task
from .errors import ConfigError
from .results import Results
from .rundir import RunDir
from .stages import Stages
from .types import Baseline, Example, PseudoLabel, Round, Task


def run(config: RunConfig, backend: Backend, run_dir: str | Path, *, task: Task | None = None,
        quiet: bool = False, report_to: Sequence[str] = ()) -> dict:
    """Run (or resume) SemiEvol; return the results also written to results.json.
    ``report_to``: experiment trackers to log to as well (see track.py)."""
    return _go(config, backend, RunDir(run_dir), task, quiet, report_to).to_json()


def _go(config: RunConfig, backend: Backend, rd: RunDir, task: Task | None, quiet: bool,
        report_to: Sequence[str] = ()) -> Results:
    task = task or load_task(config.data, limits=limits(config), columns=config.columns)
    _check_config(rd, config, task)
    tracking = track.Tracking([track.make(name) for name in report_to], rd.path,
                              f"{task.name}-{rd.run_id}")
    try:
        results = _run(config, backend, rd, task, Stages(config, backend, rd, quiet, tracking))
    except BaseException:
        tracking.finish(failed=True)  # a resume reopens the same tracking run
        raise
    tracking.finish()
    return results


@dataclasses.dataclass
class _Mining:
    """What the rounds have made so far."""

    pool: list[Example]
    """The retrieval pool: the labeled examples, and the pseudo-labeled ones selected."""
    remaining: list[Example]
    miner: str
    made: dict[str, str]
    """Model label ("sft", "r1", ...) -> the model."""
    kept: str
    """The label of the model each round must not be shown worse than."""
    rounds: list[dict] = dataclasses.field(default_factory=list)
    mined: list[PseudoLabel] = dataclasses.field(default_factory=list)
    selected: set[str] = dataclasses.field(default_factory=set)
    verdicts: list[dict] = dataclasses.field(default_factory=list)


def _run(config: RunConfig, backend: Backend, rd: RunDir, task: Task, stages: Stages) -> Results:
    stages.tracking.params(config.to_dict())
    base = config.model or backend.default_model
    train, held = stages.hold_out(task.labeled)  # the validation slice: decisions only
    warm = stages.warm_up(base, train) if config.iwp else base
    fallback: Baseline = "sft" if config.iwp else "vanilla"  # returned if evolving does not help
    checked = {"vanilla": stages.validate("vanilla", base, held)} if held else {}
    if held and config.iwp:
        checked["sft"] = stages.validate("sft", warm, held)
    auto = config.auto_recipe and bool(held)  # recipe 'auto': settings chosen on the slice
    if auto:
        config = recipe.choose(stages, warm, train, held)
    m = _Mining(list(train), list(task.unlabeled), warm, {fallback: warm}, fallback)
    for r in (Round(n) for n in range(1, config.rounds + 1)):
        if not m.remaining:
            break
        config = _round(config, stages, r, train, m, held if auto and r.number == 1 else None)
        if held:
            checked[str(r)] = stages.validate(r, m.miner, held)
            m.rounds[-1]["validation"] = checked[str(r)]["accuracy"]
            m.verdicts.append(stages.verdict(str(r), m.kept, m.made, held))
            if m.verdicts[-1]["harm"]:
                break  # evidence that this round made the model worse: keep the one before
            m.kept = str(r)

    winner = m.kept if held else str(Round(len(m.rounds)))
    final = "semievol" if Round.parse(winner) else fallback
    evolved = m.miner
    models = {"base": base, "warm": warm if config.iwp else None, "evolved": evolved,
              "final": m.made.get(winner, evolved)}
    scores = {"vanilla": stages.evaluate("vanilla", base, task.test)}
    scores["sft"] = stages.evaluate("sft", warm, task.test) if config.iwp else None
    scores["semievol"] = stages.evaluate("semievol", evolved, task.test)
    same = {base: "vanilla", warm: fallback, evolved: "semievol"}.get(models["final"])
    scores["final"] = dict(scores[same]) if same else stages.evaluate("final", models["final"], task.test)
    refit = None
    if config.refit and held and m.made[winner] != base:
        models["final"], scores["final"], refit = _refit(config, backend, rd, task, final, stages.quiet)
    validation = stages.validation(held, checked, m.made, winner, m.verdicts)
    results = _results(config, backend, rd, task, models, scores, m, validation=validation,
                       final=final, refit=refit, recipe=recipe.report(rd) if auto else None)
    results.write(rd.path)
    if stages.tracking.live:
        stages.tracking.report(rd.path)
        stages.tracking.results(results.to_json(), [rd.path / name for name in
                                                    ("results.json", "config.json", "report.md")]
                                + sorted(rd.path.glob("*.png")))
    return results


def _round(config: RunConfig, stages: Stages, r: Round, train: list[Example], m: _Mining,
           auto: list[Example] | None) -> RunConfig:
    """One round: mine the remaining questions with the last model, select, evolve. With
    recipe 'auto' (``auto``: the validation slice) it also chooses whether to replay the
    labeled examples. Returns the configuration the next rounds run with."""
    shots = stages.retrieve(r, m.pool, m.remaining) if config.icp and config.k else {}
    records = stages.collaborate(r, m.miner, m.remaining, shots, config)
    chosen, tau = stages.select(r, records, config)
    by_id = {ex.id: ex for ex in m.remaining}
    pairs = [(by_id[rec.id], rec.pseudo_label) for rec in chosen]
    if auto:
        config, evolved = recipe.replay_or_not(config, stages, r, m.miner, train, pairs, auto)
    else:
        # w/o IWP there is one fine-tune, of the base on D_L + D_selected
        replay = config.replay_labeled or (not config.iwp and r.number == 1)
        labeled = [(ex, ex.answer) for ex in train] if replay else []
        evolved = stages.evolve(r, m.miner, labeled + pairs)
    m.made[str(r)] = evolved
    m.rounds.append({"round": r.number, "mined": len(records), "selected": len(chosen),
                     "consistent": sum(rec.consistent for rec in records),
                     "justified": sum(rec.justified for rec in records),
                     "threshold": tau, "model": evolved})
    chosen_ids = {rec.id for rec in chosen}
    m.mined += records
    m.selected |= chosen_ids
    m.pool += [dataclasses.replace(ex, answer=label) for ex, label in pairs if ex.id in chosen_ids]
    m.remaining = [ex for ex in m.remaining if ex.id not in chosen_ids]
    m.miner = evolved
    return config


def _refit(config: RunConfig, backend: Backend, rd: RunDir, task: Task, final: str,
           quiet: bool) -> tuple[str, dict, dict]:
    """The model the guard chose, made again on every label (scikit-learn's ``refit``): a
    run without a slice in ``RUN_DIR/refit`` (without mining where the guard kept the
    warm-up). Returns its model, its test scores, and what results.json says of it."""
    evolve = final == "semievol"
    sub = _go(config.replace(validation=0, refit=False), backend, RunDir(rd.path / "refit"),
              task if evolve else dataclasses.replace(task, unlabeled=[]), quiet)
    label = "semievol" if evolve else "sft"
    return (sub.models["evolved" if evolve else "warm"], dict(sub.eval[label]),
            {"dir": "refit", "model": label, "labeled": len(task.labeled),
             "timings_s": sub.timings_s, "usage": sub.usage})


def _results(config: RunConfig, backend: Backend, rd: RunDir, task: Task, models: dict,
             scores: dict, m: _Mining, **decided) -> Results:
    """results.json, built once: the run's models, scores and counts, and what the guard
    (and recipe 'auto') ``decided``."""
    vanilla = scores["vanilla"]["accuracy"]
    for row in scores.values():
        if row is not None:
            row["error_reduction"] = evaluate.error_reduction(row["accuracy"], vanilla)
    accuracy = _pseudo_label_report(rd, task, m.mined, m.selected)
    return Results(
        run_id=rd.run_id, task=task.name, backend=backend.name, base_model=models["base"],
        models=models, eval=scores,
        unlabeled={"total": len(task.unlabeled),
                   "consistent": sum(r["consistent"] for r in m.rounds),
                   "justified": sum(r["justified"] for r in m.rounds),
                   "selected": len(m.selected), "pseudo_label_accuracy": accuracy},
        rounds=m.rounds,
        sizes={"labeled": len(task.labeled), "unlabeled": len(task.unlabeled),
               "test": len(task.test)},
        usage={"prompt_tokens": 0, "completion_tokens": 0, "trained_tokens": 0,
               "cost_usd": None, **rd.manifest["usage"]},
        usage_by_stage=dict(rd.manifest["usage_by_stage"]),
        timings_s=dict(rd.manifest["timings_s"]),
        runtime=backend.runtime(), config=config.to_dict(), **decided)


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
