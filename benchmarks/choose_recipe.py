"""Choose the small-model recipe's settings on labeled examples left out of the training
sample, never on the test split.

    python benchmarks/choose_recipe.py --data ../shared/data/fpb --labeled 64 [quality.py options]

1. Views: warm up on a stratified sample of --labeled examples, then pseudo-label
   --view-items left-out labeled examples with each way of reading the question (with the
   retrieved examples, without them, half and half), and compare the accuracy of all and of
   the selected pseudo-labels. Cheap: no evolve step.
2. Evolve data: with the chosen views, full runs of `quality.py --eval-on validation` (scored
   on the other left-out labeled examples) evolving on the selected pseudo-labels alone or on
   the labeled examples as well.
A change is kept only if it wins by more than one point (the cheaper setting wins a tie).
Prints tables; the last line is JSON with the chosen quality.py flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import quality

from semievol import FinetuneConfig, collaborate, load_backend, propagate, selection
from semievol.data import load_task
from semievol.types import PseudoLabel

VIEWS = {"without retrieved examples": (False, "shared"), "with retrieved examples": (True, "shared"),
         "half with, half without": (True, "mixed")}
"""(icp, views), cheapest first: a later candidate must win by MARGIN."""
EVOLVE = {"selected pseudo-labels": ["--no-replay-labeled"], "labeled + selected": ["--replay-labeled"]}
MARGIN = 0.01


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--labeled", type=int, default=64)
    p.add_argument("--view-items", type=int, default=200)
    p.add_argument("--epochs", type=float, default=quality.SMALL["epochs"])
    p.add_argument("--lr", type=float, default=quality.SMALL["learning_rate"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype")
    p.add_argument("--out", default="runs/choose")
    args, rest = p.parse_known_args(argv)

    task = load_task(args.data)
    sample = quality.stratified(task.labeled, args.labeled, args.seed)
    left_out = quality._left_out(task.labeled, sample)
    view_items = left_out[:args.view_items]
    views = _views(args, sample, view_items)
    chosen = views[_best(views, lambda r: (r["accuracy_all"] + r["accuracy_selected"]) / 2)]["flags"]

    common = ["--data", args.data, "--labeled", str(args.labeled), "--epochs", str(args.epochs),
              "--lr", str(args.lr), "--seed", str(args.seed), "--eval-on", "validation",
              "--validation-skip", str(args.view_items), "--no-reference", *rest,
              *(["--dtype", args.dtype] if args.dtype else [])]
    evolve = {}
    for name, flags in EVOLVE.items():
        slug = "-".join(f.strip("-") for f in chosen + flags)
        row = quality.main(common + chosen + flags + ["--out", f"{args.out}/{slug}"])["rows"][0]
        evolve[name] = {"flags": flags, "sft": row["sft"], "semievol": row["semievol"],
                        "total_s": row["total_s"]}
    metric = lambda r: (r["semievol"]["accuracy"] + r["semievol"]["macro_f1"]) / 2
    chosen = chosen + evolve[_best(evolve, metric)]["flags"]
    _print(views, evolve, chosen, len(view_items), row["semievol"]["n"])
    result = {"chosen": chosen, "views": views, "evolve": evolve}
    print(json.dumps(result))
    return result


def _views(args, sample, items) -> dict:
    """Pseudo-label ``items`` (labeled, answers unread by the miner) with each view."""
    backend = load_backend("hf", workdir=Path(args.out) / "views", dtype=args.dtype)
    ft = FinetuneConfig(epochs=args.epochs, learning_rate=args.lr, seed=args.seed)
    warm = propagate.warm_up(backend, backend.default_model, sample, ft, style="text",
                             key=f"choose-warm-L{len(sample)}-s{args.seed}")
    by_id = {ex.id: ex for ex in sample}
    shots = {uid: [by_id[i] for i in ids]
             for uid, ids in propagate.retrieve(backend, sample, items, 3)[0].items()}
    truth = {ex.id: ex.answer for ex in items}
    unlabeled = [dataclasses.replace(ex, answer=None) for ex in items]
    rows = {}
    for name, (icp, kind) in VIEWS.items():
        flags = ["--icp" if icp else "--no-icp", "--views", kind]
        records, started = [], time.perf_counter()
        collaborate.mine(backend, warm, unlabeled, shots,
                         collaborate.make_views(4, 1.0, icp=icp, kind=kind), style="text",
                         max_tokens=32, seed=args.seed + 1000, batch_size=16,
                         justify=quality.SMALL["justify"],
                         on_records=lambda batch, usage: records.extend(batch), quiet=True)
        kept, _ = selection.select([PseudoLabel.of(r.to_json()) for r in records],
                                   0.5,
                                   per_class=quality.SMALL["per_class"])
        kept_ids = {k.id for k in kept}
        rows[name] = {"flags": flags, "accuracy_all": _accuracy(records, truth),
                      "accuracy_selected": _accuracy([r for r in records if r.id in kept_ids],
                                                     truth), "selected": len(kept),
                      "consistent": sum(r.consistent for r in records),
                      "seconds": round(time.perf_counter() - started, 1)}
    return rows


def _accuracy(records, truth) -> float:
    return sum(r.pseudo_label == truth[r.id] for r in records) / max(1, len(records))


def _best(rows: dict, metric) -> str:
    """The first (cheapest) row unless a later one beats it by more than MARGIN."""
    best = next(iter(rows))
    for name in rows:
        if metric(rows[name]) > metric(rows[best]) + MARGIN:
            best = name
    return best


def _print(views, evolve, chosen, n_items, n_validation) -> None:
    f = lambda v: f"{100 * v:.1f}"
    print(f"\n1. views: pseudo-labels of {n_items} left-out labeled examples (n=4, vote, "
          f"per-class selection at theta 0.5)\n")
    print(f"{'views':<30}{'consistent':>11}{'PL all':>8}{'PL sel':>8}{'sel.':>6}{'time':>8}")
    for name, r in views.items():
        print(f"{name:<30}{r['consistent']:>11}{f(r['accuracy_all']):>8}"
              f"{f(r['accuracy_selected']):>8}{r['selected']:>6}{r['seconds']:>7.0f}s")
    print(f"\n2. evolve data: SemiEvol scored on {n_validation} other left-out labeled examples\n")
    print(f"{'evolve on':<30}{'SFT acc/F1':>12}{'SemiEvol acc/F1':>17}{'time':>8}")
    for name, r in evolve.items():
        sft, se = r["sft"], r["semievol"]
        print(f"{name:<30}{f(sft['accuracy']) + '/' + f(sft['macro_f1']):>12}"
              f"{f(se['accuracy']) + '/' + f(se['macro_f1']):>17}{r['total_s']:>7.0f}s")
    print(f"\nchosen: {' '.join(chosen) or '(the defaults)'}")


if __name__ == "__main__":
    main(sys.argv[1:])
