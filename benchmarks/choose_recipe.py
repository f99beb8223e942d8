"""Choose the small-model recipe's settings on a validation slice, never on the test split.

    python benchmarks/choose_recipe.py --data ../shared/data/fpb --labeled 64 [quality.py options]

Runs `quality.py --eval-on validation` (trained on a stratified sample of the labeled split,
scored on the labeled examples left out of it) for each candidate, one change at a time:
how the n inferences read the question (with the retrieved examples, without, or half and
half), then evolving on the labeled examples as well, then a shorter evolve step. A change
is kept only if it raises validation macro-F1 + accuracy by more than half a point (the
cheaper setting wins a tie). Prints a table; the last line is JSON with the chosen flags.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import quality  # noqa: E402

VIEWS = {"with retrieved examples": [], "without (plain prompt)": ["--no-icp"],
         "half with, half without": ["--views", "mixed"]}
STEPS = [("evolve on D_L + D_selected", ["--replay-labeled"]),
         ("evolve 2 epochs instead of 4", ["--evolve-epochs", "2"])]
MARGIN = 0.005


def main(argv: list[str]) -> dict:
    out = _option(argv, "--out", "runs/choose")
    common = [a for a in _without(argv, "--out")] + ["--eval-on", "validation", "--no-reference"]
    rows = []

    def score(name: str, flags: list[str]) -> float:
        slug = "-".join(f.strip("-") for f in flags) or "default"
        summary = quality.main(common + flags + ["--out", f"{out}/{slug}"])
        row = summary["rows"][0]["semievol"]
        rows.append({"candidate": name, "flags": flags, "accuracy": row["accuracy"],
                     "macro_f1": row["macro_f1"], "sft": summary["rows"][0]["sft"],
                     "total_s": summary["rows"][0]["total_s"]})
        return (row["accuracy"] + row["macro_f1"]) / 2

    scores = {name: score(name, flags) for name, flags in VIEWS.items()}
    best_name = max(scores, key=lambda n: scores[n] + (MARGIN if not VIEWS[n] else 0))
    chosen, best = VIEWS[best_name], scores[best_name]
    for name, flags in STEPS:
        value = score(name, chosen + flags)
        cheaper = "--evolve-epochs" in flags
        if value > best + MARGIN or (cheaper and value >= best - MARGIN):
            chosen, best = chosen + flags, value
    _print(rows, chosen)
    result = {"chosen": chosen, "rows": rows}
    print(json.dumps(result))
    return result


def _print(rows: list[dict], chosen: list[str]) -> None:
    f = lambda v: f"{100 * v:.1f}"
    print(f"\nvalidation (labeled examples left out of the sample)\n")
    print(f"{'candidate':<34}{'flags':<34}{'SFT acc/F1':>12}{'SemiEvol acc/F1':>17}{'time':>8}")
    for r in rows:
        sft = f"{f(r['sft']['accuracy'])}/{f(r['sft']['macro_f1'])}"
        print(f"{r['candidate']:<34}{' '.join(r['flags']) or '-':<34}{sft:>12}"
              f"{f(r['accuracy']) + '/' + f(r['macro_f1']):>17}{r['total_s']:>7.0f}s")
    print(f"\nchosen: {' '.join(chosen) or '(the defaults)'}")


def _option(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def _without(argv: list[str], name: str) -> list[str]:
    if name not in argv:
        return list(argv)
    i = argv.index(name)
    return argv[:i] + argv[i + 2:]


if __name__ == "__main__":
    main(sys.argv[1:])
