"""The paper's table on a real task with few labels: vanilla, SFT and SemiEvol.

    python benchmarks/quality.py --data ../shared/data/fpb --labeled 64 [--budgets 32,64,128]
                                 [--ablations [--only 'w/o CL,w/o AS']] [--rounds 2]
                                 [--seeds 0,1,2] [--auto]
                                 [--validation N] [--recipe small|paper] [--backend hf|openai ...]

Takes a seeded, class-stratified sample of the labeled split, keeps the full unlabeled and
test splits, runs SemiEvol (each run resumable in --out), and adds the reference "SFT on all
labeled examples", so we can say what share of the gap between SFT on the sample and SFT on
everything SemiEvol closes. Each run holds out the guard's validation slice of its sample
(``--validation``; 0 for none) and reports the model the guard returns ("final"); SFT is
then the warm-up on the sample less that slice, the gap is measured from it. With
``--seeds`` each seed draws its own labeled sample, and the table ends with the mean and
spread of the gap closed over the samples. Prints a table; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from semievol import FinetuneConfig, RunConfig, load_backend, report
from semievol.config import RECIPES, VIEWS
from semievol.data import load_task
from semievol.pipeline import run

RESULTS_DIR = Path(__file__).resolve().parent
SMALL = RECIPES["small"]
"""The defaults are `semievol run`'s on the hf backend."""


def _ablations(icp: bool) -> dict:
    """The paper's table 2 rows; ICP is switched on where the main row runs without it."""
    return {"w/o IWP": {"iwp": False}, **({"w/o ICP": {"icp": False}} if icp else
                                         {"with ICP": {"icp": True}}),
            "w/o CL": {"cl": False}, "w/o AS": {"adaptive_selection": False}}


def stratified(examples, size: int, seed: int):
    """``size`` examples with the classes in their proportions (at least one each)."""
    rng = random.Random(seed)
    by_class = defaultdict(list)
    for ex in examples:
        by_class[ex.answer].append(ex)
    picked = []
    for label, group in sorted(by_class.items()):
        rng.shuffle(group)
        picked += group[:max(1, round(size * len(group) / len(examples)))]
    rng.shuffle(picked)
    return picked[:size]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--labeled", type=int, default=64)
    p.add_argument("--budgets", help="comma-separated label budgets (overrides --labeled)")
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--only", help="comma-separated variants to run (e.g. 'w/o CL,w/o AS'), so "
                   "two processes can share the ablations; a later run of all of them reuses "
                   "the finished run directories")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--backend", default="hf", choices=["hf", "openai"])
    p.add_argument("--model")
    p.add_argument("--base-url")
    p.add_argument("--epochs", type=float, default=SMALL["epochs"])
    p.add_argument("--lr", type=float, default=SMALL["learning_rate"])
    p.add_argument("--evolve-lr", type=float)
    p.add_argument("--evolve-epochs", type=float, default=SMALL["evolve_epochs"])
    p.add_argument("--justify", choices=["model", "vote"], default=SMALL["justify"])
    p.add_argument("--selection", choices=["global", "per-class"],
                   default="per-class" if SMALL["per_class"] else "global")
    p.add_argument("--views", choices=VIEWS, default=SMALL["views"])
    p.add_argument("--icp", action=argparse.BooleanOptionalAction, default=SMALL["icp"],
                   help="show the inferences the retrieved labeled examples")
    p.add_argument("--replay-labeled", action=argparse.BooleanOptionalAction,
                   default=SMALL["replay_labeled"], help="evolve on D_L + D_selected")
    p.add_argument("--theta", type=float, default=0.5)
    p.add_argument("--eval-on", choices=["test", "validation"], default="test",
                   help="validation: the labeled examples left out of the sample (for tuning)")
    p.add_argument("--validation-skip", type=int, default=0,
                   help="leave the first N left-out examples out of the validation slice")
    p.add_argument("--dtype", help="hf backend dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--generation-batch", type=int, default=16)
    p.add_argument("--limit-unlabeled", type=int)
    p.add_argument("--limit-test", type=int)
    p.add_argument("--no-reference", action="store_true", help="skip SFT on all labeled")
    p.add_argument("--reference-accuracy", type=float, help="test accuracy of SFT on all labeled "
                   "from an earlier run of the same settings (RESULTS.md): skips that run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", help="comma-separated seeds, one labeled sample each (overrides --seed)")
    p.add_argument("--validation", type=int, help="the guard's validation slice (default: "
                   "semievol's, 20%% of the sample; 0: none)")
    p.add_argument("--auto", action="store_true", help="recipe 'auto': the validation slice "
                   "chooses retrieval, vote or self-justify, selection and labeled replay")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--figures", help="copy the first run's report figures into this folder and "
                   "print Markdown links to them (record.py puts them in RESULTS.md)")
    p.add_argument("--recipe", choices=["small", "paper"], default="small",
                   help="the defaults of the flags above ('paper': the paper's settings, "
                   "which collapse the embedded model on fpb)")
    p.add_argument("--prompt-style", choices=["text", "letter"])
    recipe = RECIPES[p.parse_known_args(argv)[0].recipe]
    p.set_defaults(epochs=recipe["epochs"], lr=recipe["learning_rate"],
                   evolve_epochs=recipe.get("evolve_epochs", recipe["epochs"]),
                   justify=recipe["justify"], views=recipe["views"], icp=recipe["icp"],
                   selection="per-class" if recipe["per_class"] else "global",
                   replay_labeled=recipe["replay_labeled"], prompt_style=recipe["prompt_style"])
    args = p.parse_args(argv)

    full = load_task(args.data, limits={"unlabeled": args.limit_unlabeled, "test": args.limit_test})
    ft = FinetuneConfig(epochs=args.epochs, learning_rate=args.lr, seed=args.seed)
    base = RunConfig(data=args.data, backend=args.backend, model=args.model, base_url=args.base_url,
                     rounds=args.rounds, seed=args.seed, finetune=ft, justify=args.justify,
                     per_class=args.selection == "per-class", views=args.views,
                     icp=args.icp, replay_labeled=args.replay_labeled, theta=args.theta,
                     prompt_style=args.prompt_style,
                     generation_batch=args.generation_batch,
                     evolve_finetune=ft.replace(learning_rate=args.evolve_lr or args.lr,
                                                epochs=args.evolve_epochs),
                     limit_unlabeled=args.limit_unlabeled, limit_test=args.limit_test,
                     validation=args.validation, auto_recipe=args.auto)
    out = Path(args.out)
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else [args.labeled]
    rows, started, first_run = [], time.perf_counter(), None
    for budget, seed in [(b, s) for b in budgets for s in seeds]:
        sample = stratified(full.labeled, budget, seed)
        task = dataclasses.replace(full, labeled=sample)
        if args.eval_on == "validation":
            task = dataclasses.replace(task, test=_left_out(full.labeled, sample)[args.validation_skip:][:args.limit_test])
        main_row = "SemiEvol auto" if args.auto else f"SemiEvol{' paper' * (args.recipe == 'paper')}"
        variants = {main_row: {},
                    **(_ablations(args.icp) if args.ablations else {})}
        if args.only:
            if unknown := set(args.only.split(",")) - set(variants):
                p.error(f"--only: no variant {', '.join(sorted(unknown))} (there are "
                        f"{', '.join(variants)})")
            variants = {name: variants[name] for name in args.only.split(",")}
        for name, switches in variants.items():
            config = base.replace(limit_labeled=budget, seed=seed,
                                  finetune=ft.replace(seed=seed), **switches)
            suffix = f"-s{seed}" if args.seeds else ""
            run_dir = out / f"{full.name}-{args.backend}-L{budget}-{_slug(name)}{suffix}"
            backend = _backend(args, run_dir)
            results = run(config, backend, run_dir, task=task)
            rows.append({**_row(name, budget, results), "seed": seed})
            _done(rows[-1])  # as it comes: a run killed later still shows this one
            first_run = first_run or run_dir
    reference = None
    if args.reference_accuracy is not None:
        reference = {"accuracy": args.reference_accuracy, "macro_f1": None, "given": True}
    elif not args.no_reference and args.eval_on == "test":
        run_dir = out / f"{full.name}-{args.backend}-L{len(full.labeled)}-sft"
        config = base.replace(n=1, k=0, icp=False, cl=False, limit_labeled=None, validation=0,
                              auto_recipe=False)
        results = run(config, _backend(args, run_dir), run_dir,
                      task=dataclasses.replace(full, unlabeled=[]))
        reference = results["eval"]["sft"]
    summary = _print(rows, reference, full.name, args)
    if args.figures and rows:
        _figures(first_run, Path(args.figures), f"{full.name}-{args.backend}-L{budgets[0]}")
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary))
    return summary


def _figures(run_dir: Path, folder: Path, prefix: str) -> None:
    """The run's report figures, copied as ``folder/prefix-<figure>.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    report.write_report(run_dir)
    for png in sorted(run_dir.glob("*.png")):
        target = folder / f"{prefix}-{png.name}"
        shutil.copyfile(png, target)
        link = os.path.relpath(target.resolve(), RESULTS_DIR)  # as RESULTS.md sees it
        print(f"![{png.stem.replace('_', ' ')}]({link})")


def _left_out(labeled, sample):
    taken = {ex.id for ex in sample}
    return [ex for ex in labeled if ex.id not in taken]


def _backend(args, run_dir: Path):
    if args.backend == "hf":
        return load_backend("hf", model=args.model, workdir=run_dir / "backend", dtype=args.dtype)
    return load_backend("openai", model=args.model, base_url=args.base_url, workdir=run_dir / "backend")


def _row(name: str, budget: int, r: dict) -> dict:
    ev, u = r["eval"], r["unlabeled"]
    return {"variant": name, "labeled": budget,
            "vanilla": ev["vanilla"], "sft": ev["sft"], "semievol": ev["semievol"],
            "final": r.get("final"), "final_eval": ev.get("final"),
            "validation": r.get("validation", {}).get("scores"),
            "guard": [{k: c[k] for k in ("candidate", "incumbent", "difference", "interval",
                                         "p_harm", "harm")}
                      for c in r.get("validation", {}).get("comparisons") or []],
            "recipe": (r.get("recipe") or {}).get("chosen"),
            "rounds": len(r["rounds"]), "selected": u["selected"],
            "pseudo_acc_all": u["pseudo_label_accuracy"]["all"],
            "pseudo_acc_selected": u["pseudo_label_accuracy"]["selected"],
            "timings_s": r["timings_s"], "total_s": round(sum(r["timings_s"].values()), 1)}


def _print(rows, reference, task, args) -> dict:
    f = lambda v: "-" if v is None else f"{100 * v:.1f}"
    print(f"\n{task}, {args.backend}, machine: {platform.machine()} {platform.node()}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print(f"{'variant':<15}{'L':>5}{'seed':>5}{'vanilla acc/F1':>16}{'SFT acc/F1':>14}"
          f"{'SemiEvol acc/F1':>17}{'err.red.':>10}{'rounds':>7}{'sel.':>6}{'PL all':>8}"
          f"{'PL sel':>8}"
          f"{'gap closed':>12}{'final (guard)':>16}{'its gap':>9}{'time':>8}")
    out = {"task": task, "backend": args.backend, "rows": [], "reference_sft_all": reference}
    for r in rows:
        sft = r["sft"] or {"accuracy": None, "macro_f1": None}
        gap, final_gap = _gap(r["semievol"], sft, reference), _gap(r["final_eval"], sft, reference)
        final = f"{r['final'] or '-'} {f((r['final_eval'] or {}).get('accuracy'))}"
        print(f"{r['variant']:<15}{r['labeled']:>5}{r['seed']:>5}"
              f"{f(r['vanilla']['accuracy']) + '/' + f(r['vanilla']['macro_f1']):>16}"
              f"{f(sft['accuracy']) + '/' + f(sft['macro_f1']):>14}"
              f"{f(r['semievol']['accuracy']) + '/' + f(r['semievol']['macro_f1']):>17}"
              f"{f(r['semievol'].get('error_reduction')):>10}{r['rounds']:>7}{r['selected']:>6}"
              f"{f(r['pseudo_acc_all']):>8}{f(r['pseudo_acc_selected']):>8}{f(gap):>12}"
              f"{final:>16}{f(final_gap):>9}{r['total_s']:>7.0f}s")
        out["rows"].append({**r, "gap_closed": gap, "final_gap_closed": final_gap})
    groups = defaultdict(list)
    for r in out["rows"]:
        groups[(r["variant"], r["labeled"])].append(r)
    out["over_seeds"] = []
    for (variant, labeled), group in groups.items():
        if len(group) < 2:
            continue
        row = {"variant": variant, "labeled": labeled, "seeds": [r["seed"] for r in group],
               "sft": _spread([r["sft"]["accuracy"] for r in group]),
               "semievol": _spread([r["semievol"]["accuracy"] for r in group]),
               "final": _spread([(r["final_eval"] or {}).get("accuracy") for r in group]),
               "gap_closed": _spread([r["gap_closed"] for r in group]),
               "final_gap_closed": _spread([r["final_gap_closed"] for r in group])}
        out["over_seeds"].append(row)
        said = [f"{name} mean {f(v['mean'])} (sd {f(v['sd'])}, {f(v['min'])} to {f(v['max'])})"
                for name, v in (("SFT accuracy", row["sft"]), ("SemiEvol", row["semievol"]),
                                ("the guard's final model", row["final"]),
                                ("gap closed by SemiEvol", row["gap_closed"]),
                                ("by the final model", row["final_gap_closed"]))
                if v["mean"] is not None]
        print(f"\n{variant}, {labeled} labels, {len(group)} samples: " + "; ".join(said))
    if rows:
        first = rows[0]
        stages = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in first["timings_s"].items())
        print(f"\nstage wall times of the first row ({first['total_s']:.0f}s in all): {stages}")
    if reference:
        given = " (given with --reference-accuracy)" if reference.get("given") else ""
        print(f"\nreference: SFT on all labeled{given}: accuracy {f(reference['accuracy'])}, "
              f"macro-F1 {f(reference['macro_f1'])}")
    return out


def _done(r: dict) -> None:
    f = lambda v: "-" if v is None else f"{100 * v:.1f}"
    sft = (r["sft"] or {}).get("accuracy")
    print(f"done: {r['variant']}, {r['labeled']} labels, seed {r['seed']}: SFT {f(sft)}, SemiEvol "
          f"{f(r['semievol']['accuracy'])}, final {r['final']} "
          f"{f((r['final_eval'] or {}).get('accuracy'))}, pseudo-labels all "
          f"{f(r['pseudo_acc_all'])} selected {f(r['pseudo_acc_selected'])}, validation "
          + ", ".join(f"{k} {f(v['accuracy'])}" for k, v in (r["validation"] or {}).items())
          + "".join(f", {c['candidate']} vs {c['incumbent']}: Brier {c['difference']:+.3f} "
                    f"({c['interval'][0]:+.3f} to {c['interval'][1]:+.3f}, p {c['p_harm']:.3f})"
                    for c in r["guard"])
          + (f", recipe chosen {r['recipe']}" if r["recipe"] else "")
          + f" ({r['total_s']:.0f}s)", flush=True)


def _spread(values: list) -> dict:
    """Mean, standard deviation and range of the values that were measured."""
    values = [v for v in values if v is not None]
    return {"mean": statistics.mean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values, default=None), "max": max(values, default=None)}


def _gap(model, sft, reference):
    """The share of the gap between SFT on the sample and SFT on every label that ``model``
    closes (None without a reference, or where SFT on the sample is already as good)."""
    if not (model and reference and sft["accuracy"] is not None
            and reference["accuracy"] > sft["accuracy"]):
        return None
    return (model["accuracy"] - sft["accuracy"]) / (reference["accuracy"] - sft["accuracy"])


def _slug(name: str) -> str:
    return name.lower().replace("/", "").replace(" ", "-")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
