"""How the guard decides when its validation slice cannot tell the models apart.

    python benchmarks/guard_ties.py runs/seeds/* runs/small13/*

For each finished run directory with a validation slice: the warm-up's (SFT) and the
evolved model's accuracy on the slice, a finer score of the same answers, what the guard
returned, and what the test split says of the two models. The finer score is the mean
confidence signed by correctness: each answer counts +c when right and -c when wrong, c
= exp(-entropy) of the greedy answer (recorded in ``eval_validation_*.jsonl``). Run
directories written before entropies were recorded are scored again with the hf backend
(their models are in the run directory). Prints a table; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from semievol import RunConfig, load_backend
from semievol.data import load_task
from semievol.evaluate import predict
from semievol.rundir import stream_jsonl


def signed_confidence(records: list[dict]) -> float:
    """Mean of +c for a right answer and -c for a wrong one, c = exp(-entropy)."""
    def c(r):
        return math.exp(-r["entropy"]) if r["entropy"] is not None else 0.0
    return sum(c(r) if r["correct"] else -c(r) for r in records) / len(records)


def answers(run: Path, label: str, model: str, rescore) -> list[dict]:
    """The validation answers of ``model`` (scored again when no entropy was recorded)."""
    records = list(stream_jsonl(run / f"eval_validation_{label}.jsonl"))
    if all("entropy" in r for r in records):
        return records
    return rescore(run, model, [r["id"] for r in records])


def rescorer():
    backends, tasks = {}, {}

    def rescore(run: Path, model: str, ids: list[str]) -> list[dict]:
        config = RunConfig.load(run / "config.json")
        if run not in backends:
            backends.clear()  # one model in memory at a time
            backends[run] = load_backend("hf", model=config.model, workdir=run / "backend")
        if config.data not in tasks:
            tasks[config.data] = {ex.id: ex for ex in load_task(config.data).labeled}
        out: list[dict] = []
        predict(backends[run], model, [tasks[config.data][i] for i in ids],
                style=config.prompt_style, max_tokens=config.max_tokens, batch_size=16,
                on_records=lambda recs, usage: out.extend(r.to_json() for r in recs), quiet=True)
        return out
    return rescore


def study(run: Path, rescore) -> dict | None:
    results = json.loads((run / "results.json").read_text())
    validation = results.get("validation") or {}
    if not validation.get("n") or "sft" not in validation["scores"]:
        return None
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    evolved_model = stages["eval_semievol"]["model"]
    evolved = next(name.removeprefix("eval_validation_") for name, info in stages.items()
                   if name.startswith("eval_validation_") and info.get("model") == evolved_model)
    sft = answers(run, "sft", stages["eval_validation_sft"]["model"], rescore)
    evo = answers(run, evolved, evolved_model, rescore)
    accuracy = tuple(sum(r["correct"] for r in rs) / len(rs) for rs in (sft, evo))
    tie = accuracy[0] == accuracy[1]
    signed = (signed_confidence(sft), signed_confidence(evo))
    test = (results["eval"]["sft"]["accuracy"], results["eval"]["semievol"]["accuracy"])
    return {"run": run.name, "n": validation["n"],
            "validation": accuracy,
            "signed": signed, "tie": tie, "guard": results["final"],
            "tie_break": ("semievol" if signed[1] > signed[0] else "sft") if tie else results["final"],
            "test": test}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args(argv)
    rescore = rescorer()
    rows = [row for run in args.runs if (run / "results.json").exists()
            if (row := study(run, rescore)) is not None]
    print("| run | n | validation SFT / SemiEvol | signed confidence SFT / SemiEvol "
          "| guard returns | tie broken by confidence | test SFT / SemiEvol |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['n']} | {100 * r['validation'][0]:.1f} / "
              f"{100 * r['validation'][1]:.1f}{' (tie)' if r['tie'] else ''} | "
              f"{r['signed'][0]:.3f} / {r['signed'][1]:.3f} | {r['guard']} | {r['tie_break']} | "
              f"{100 * r['test'][0]:.1f} / {100 * r['test'][1]:.1f} |")

    def test_accuracy(pick) -> float:  # mean test accuracy of the models a rule returns
        return sum(r["test"][r[pick] == "semievol"] for r in rows) / len(rows) if rows else 0.0
    summary = {"runs": len(rows), "ties": sum(r["tie"] for r in rows),
               "test_accuracy": {"sft": sum(r["test"][0] for r in rows) / max(1, len(rows)),
                                 "semievol": sum(r["test"][1] for r in rows) / max(1, len(rows)),
                                 "guard": test_accuracy("guard"),
                                 "ties_broken_by_confidence": test_accuracy("tie_break")}}
    print(f"\n{summary['runs']} runs, {summary['ties']} tied on validation. Mean test accuracy of "
          "the model returned: " + ", ".join(f"{rule.replace('_', ' ')} {100 * a:.2f}"
                                             for rule, a in summary["test_accuracy"].items()))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
