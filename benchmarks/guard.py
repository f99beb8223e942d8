"""The guard's regret: each rule re-decides finished runs from their saved validation
answers, and the test split says what the decision cost. No model runs.

    python benchmarks/guard.py runs/g64/* runs/collapse/* [--resamples 2000]

For each run directory with a validation slice: the warm-up's (SFT, or vanilla without
IWP) and round 1's greedy answers (``eval_validation_*.jsonl``) and sampled evidence
(``evidence_*.jsonl``, which semievol writes since the guard decides on evidence; resume an
older run with it to add them), and both models' test accuracy from results.json. Rules:

- ``old``: greedy accuracy on the slice, a tie keeps SFT (semievol before this change);
- ``evidence``: SemiEvol unless the Brier scores of sampled answers show harm
  (``guard.compare``, one-sided p < 0.05): the rule semievol runs now;
- ``0/1 harm``: the same rule on greedy right/wrong (the exact sign test), to show what
  the finer score adds;
- ``always SemiEvol`` and ``always SFT``, for reference.

Per run: each rule's decision and its regret (the better of SFT and SemiEvol on test minus
the returned model's accuracy); per folder of runs and over all, the mean regret. The
power columns bootstrap the slice's questions: how often each harm test flags harm on
slices drawn like this one (on a collapse: the power to catch it; where SemiEvol is
better on test: the false-alarm rate). Prints Markdown tables; the last line is one JSON
object.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

from semievol import guard
from semievol.rundir import stream_jsonl

RULES = ("old", "evidence", "0/1 harm", "always SemiEvol", "always SFT")


def evidence(run: Path) -> dict | None:
    """What the rules read of one run (None: no slice, no round, or no sampled evidence)."""
    results = json.loads((run / "results.json").read_text())
    v = results.get("validation") or {}
    base = "sft" if results["eval"].get("sft") else "vanilla"
    if not v.get("n") or "r1" not in v.get("scores", {}):
        return None
    sampled = {k: list(stream_jsonl(run / f"evidence_{k}.jsonl")) for k in (base, "r1")}
    if not all(sampled.values()):
        print(f"{run}: no sampled evidence (resume it with this semievol)", file=sys.stderr)
        return None
    greedy = {k: {r["id"]: r["correct"] for r in stream_jsonl(run / f"eval_validation_{k}.jsonl")}
              for k in (base, "r1")}
    test = (results["eval"][base]["accuracy"], results["eval"]["semievol"]["accuracy"])
    return {"run": run.name, "group": run.parent.name, "path": run, "n": v["n"], "base": base,
            "greedy": (greedy[base], greedy["r1"]), "sampled": (sampled[base], sampled["r1"]),
            "test": test}


def decide(rule: str, greedy: tuple[dict, dict], sampled: tuple[list, list]) -> int:
    """0: the warm-up (or vanilla), 1: SemiEvol."""
    (g0, g1), (s0, s1) = greedy, sampled
    if rule == "old":
        return int(sum(g1.values()) > sum(g0.values()))
    if rule == "evidence":
        return int(not guard.compare(s1, s0)["harm"])
    if rule == "0/1 harm":
        return int(not guard.significantly_better(g0, g1))
    return int(rule == "always SemiEvol")


def power(row: dict, resamples: int) -> dict:
    """How often each harm test flags harm on bootstrap resamples of the slice's questions."""
    rng = random.Random(0)
    ids = list(row["greedy"][0])
    by_id = [{r["id"]: r for r in rs} for rs in row["sampled"]]
    flagged = {"evidence": 0, "0/1 harm": 0}
    for _ in range(resamples):
        draw = [(f"{q}#{j}", q) for j, q in enumerate(rng.choices(ids, k=len(ids)))]
        greedy = tuple({key: g[q] for key, q in draw} for g in row["greedy"])
        sampled = tuple([{**s[q], "id": key} for key, q in draw] for s in by_id)
        for rule in flagged:
            flagged[rule] += decide(rule, greedy, sampled) == 0
    return {rule: count / resamples for rule, count in flagged.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap slices for the power columns")
    p.add_argument("--unguarded", nargs="*", type=Path, default=[],
                   help="runs of the same samples without a slice (--validation 0): what the "
                   "slice costs, and what --refit (which runs exactly that) would return")
    args = p.parse_args(argv)
    rows = [row for run in args.runs if (run / "results.json").exists()
            if (row := evidence(run)) is not None]
    pct = lambda x: f"{100 * x:.1f}"
    print("| run | n | val. acc. base / SemiEvol | Brier base / SemiEvol | difference (90% interval), p "
          "| test base / SemiEvol | old | evidence | regret old / evidence | flags harm: Brier / 0/1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        c = guard.compare(row["sampled"][1], row["sampled"][0])
        row["compare"] = {k: c[k] for k in ("difference", "interval", "p_harm", "brier", "p_right")}
        row["decisions"] = {rule: decide(rule, row["greedy"], row["sampled"]) for rule in RULES}
        row["regret"] = {rule: max(row["test"]) - row["test"][d] for rule, d in row["decisions"].items()}
        row["power"] = power(row, args.resamples)
        names = lambda d: "SemiEvol" if d else row["base"]
        acc = [sum(g.values()) / len(g) for g in row["greedy"]]
        print(f"| {row['group']}/{row['run']} | {row['n']} | {pct(acc[0])} / {pct(acc[1])} | "
              f"{c['brier'][1]:.3f} / {c['brier'][0]:.3f} | {c['difference']:+.3f} "
              f"({c['interval'][0]:+.3f} to {c['interval'][1]:+.3f}), {c['p_harm']:.3f} | "
              f"{pct(row['test'][0])} / {pct(row['test'][1])} | {names(row['decisions']['old'])} | "
              f"{names(row['decisions']['evidence'])} | {pct(row['regret']['old'])} / "
              f"{pct(row['regret']['evidence'])} | {pct(row['power']['evidence'])}% / "
              f"{pct(row['power']['0/1 harm'])}% |")
    groups = defaultdict(list)
    for row in rows:
        groups[row["group"]].append(row)
    if rows:
        groups["all"] = rows
    print("\nMean regret (test accuracy points) of the model each rule returns:\n")
    print("| runs | count | " + " | ".join(RULES) + " |")
    print("|---|---|" + "---|" * len(RULES))
    summary = {}
    for name, group in groups.items():
        mean = {rule: sum(r["regret"][rule] for r in group) / len(group) for rule in RULES}
        summary[name] = {"runs": len(group), "mean_regret": mean}
        print(f"| {name} | {len(group)} | " + " | ".join(pct(mean[rule]) for rule in RULES) + " |")
    out = {"rules": list(RULES), "groups": summary,
           "runs": [{k: row[k] for k in ("run", "group", "n", "test", "decisions", "regret",
                                          "power", "compare")} for row in rows]}
    if args.unguarded:
        out["slice_cost"] = slice_cost(rows, args.unguarded)
    print(json.dumps(out))
    return out


def _sample(results: dict) -> tuple:
    """Which labeled sample a run is of: task, labels drawn, seed."""
    return results["task"], results["sizes"]["labeled"], results["config"]["seed"]


def slice_cost(rows: list[dict], unguarded: list[Path]) -> list[dict]:
    """Per labeled sample: SFT and SemiEvol on test with the slice held out and without it,
    the model the evidence rule returns, and what a refit returns (the unguarded run's model
    of the kind the rule chose) at what extra time."""
    off = {_sample(r): r for r in (json.loads((d / "results.json").read_text())
                                   for d in unguarded if (d / "results.json").exists())}
    pct = lambda x: f"{100 * x:.1f}"
    print("\nWhat the slice costs (test accuracy; the slice's labels held out / trained on):\n")
    print("| sample | SFT held / all | SemiEvol held / all | evidence rule returns | with refit | refit's extra time |")
    print("|---|---|---|---|---|---|")
    table = []
    for row in rows:
        on = json.loads((row["path"] / "results.json").read_text())
        if (o := off.get(_sample(on))) is None:
            continue
        chosen = "semievol" if row["decisions"]["evidence"] else "sft"
        item = {"sample": list(_sample(on)), "sft": [on["eval"]["sft"]["accuracy"], o["eval"]["sft"]["accuracy"]],
                "semievol": [on["eval"]["semievol"]["accuracy"], o["eval"]["semievol"]["accuracy"]],
                "final": on["eval"][chosen]["accuracy"], "refit": o["eval"][chosen]["accuracy"],
                "refit_s": sum(o["timings_s"].values()), "run_s": sum(on["timings_s"].values())}
        table.append(item)
        print(f"| {'/'.join(map(str, item['sample']))} | {pct(item['sft'][0])} / {pct(item['sft'][1])} | "
              f"{pct(item['semievol'][0])} / {pct(item['semievol'][1])} | {chosen} {pct(item['final'])} | "
              f"{pct(item['refit'])} | +{item['refit_s']:.0f}s on {item['run_s']:.0f}s |")
    return table


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
