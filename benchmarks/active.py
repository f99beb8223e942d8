"""Which labels to add: `semievol suggest`'s strategies against random labels, on fpb.

    python benchmarks/active.py --data ../shared/data/fpb [--labeled 32] [--add 32]
                                [--pool 128] [--limit-test 120] [--seeds 0,1,2]
                                [--semievol combined,random] [--out runs/active]

For each seed: a class-stratified sample of ``--labeled`` labels, a seeded pool of
``--pool`` unlabeled questions and the first ``--limit-test`` test questions. SemiEvol runs
on them (the run `semievol suggest` reads). Each strategy then picks ``--add`` questions of
the pool; an oracle annotator gives their gold answers (the unlabeled split's hidden ones);
SFT on the grown labeled set is trained and scored for every strategy, and SemiEvol is run
again (on the rest of the pool) for the strategies in ``--semievol``. The strategies that
get SemiEvol go first, seed by seed, then the SFT-only ones, so a run stopped early has the
comparison that matters. Every run directory is kept in --out, so a killed benchmark
resumes. No validation slice (--validation 0): every label trains. Prints a table; the last
line is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import stratified  # noqa: E402

from semievol import RunConfig, load_backend  # noqa: E402
from semievol import evaluate, propagate, suggest  # noqa: E402
from semievol.data import load_task  # noqa: E402
from semievol.evaluate import Prediction  # noqa: E402
from semievol.pipeline import run  # noqa: E402
from semievol.rundir import atomic_write_json  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--labeled", type=int, default=32)
    p.add_argument("--add", type=int, default=32)
    p.add_argument("--pool", type=int, default=128)
    p.add_argument("--limit-test", type=int, default=120)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--strategies", default=",".join(suggest.STRATEGIES))
    p.add_argument("--semievol", default=f"{suggest.DEFAULT_STRATEGY},random",
                   help="strategies whose grown label set also gets a SemiEvol run")
    p.add_argument("--out", default="runs/active")
    args = p.parse_args(argv)

    full = load_task(args.data)
    test = full.test[:args.limit_test]
    base = RunConfig.recipe("small", data=args.data, backend="hf", validation=0)
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = args.strategies.split(",")
    evolving = [s for s in args.semievol.split(",") if s]
    out, started, rows = Path(args.out), time.perf_counter(), []
    jobs = [(seed, s, True) for seed in seeds for s in evolving] + \
           [(seed, s, False) for seed in seeds for s in strategies if s not in evolving]
    for seed, strategy, evolve in jobs:
        config = base.replace(seed=seed, finetune=base.finetune.replace(seed=seed),
                              evolve_finetune=base.evolve_ft.replace(seed=seed))
        sample = stratified(full.labeled, args.labeled, seed)
        pool = random.Random(seed).sample(full.unlabeled, args.pool)
        first = out / f"s{seed}-L{args.labeled}"
        task = dataclasses.replace(full, labeled=sample, unlabeled=pool, test=test)
        start = run(config, _backend(first), first, task=task, quiet=True)
        chosen = _choose(first, pool, sample, strategy, args.add, seed)
        answered = [dataclasses.replace(ex, answer=full.hidden[ex.id]) for ex in chosen]
        grown = dataclasses.replace(task, labeled=sample + answered,
                                    unlabeled=[ex for ex in pool if ex not in set(chosen)])
        name = out / f"s{seed}-L{args.labeled}+{args.add}-{strategy}"
        if evolve:
            r = run(config, _backend(name), name, task=grown, quiet=True)
            sft, semievol = r["eval"]["sft"], r["eval"]["semievol"]
        else:
            sft, semievol = _sft(config, name, grown), None
        row = {"seed": seed, "strategy": strategy, "start_sft": start["eval"]["sft"]["accuracy"],
               "start_semievol": start["eval"]["semievol"]["accuracy"],
               "sft": sft["accuracy"], "sft_f1": sft["macro_f1"],
               "semievol": semievol and semievol["accuracy"],
               "semievol_f1": semievol and semievol["macro_f1"],
               "added_classes": {c: sum(ex.answer == c for ex in answered)
                                 for c in sorted({ex.answer for ex in answered})}}
        rows.append(row)
        print(f"done: seed {seed} {strategy}: SFT {100 * row['sft']:.1f}"
              + (f", SemiEvol {100 * row['semievol']:.1f}" if evolve else "")
              + f" (from SFT {100 * row['start_sft']:.1f}, SemiEvol "
              f"{100 * row['start_semievol']:.1f}; added {row['added_classes']}) "
              f"[{time.perf_counter() - started:.0f}s]", flush=True)
    summary = _summary(rows, args, len(test))
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary))
    return summary


def _backend(run_dir: Path):
    return load_backend("hf", workdir=run_dir / "backend")


def _choose(run_dir: Path, pool, sample, strategy: str, k: int, seed: int):
    """The ``k`` pool questions ``strategy`` suggests from the first run (kept in the run
    directory, so a resumed benchmark adds the same ones)."""
    path = run_dir / f"suggested-{strategy}.json"
    if not path.exists():
        items = [c for c in suggest.candidates(run_dir)[0] if c.example.id in {ex.id for ex in pool}]
        embed = suggest.embedder(run_dir, _backend(run_dir)) if strategy == "combined" else None
        ranked = suggest.rank(items, k, strategy, labeled=sample, embed=embed, seed=seed)
        atomic_write_json(path, [c.example.id for c in ranked])
    by_id = {ex.id: ex for ex in pool}
    return [by_id[i] for i in json.loads(path.read_text())]


def _sft(config: RunConfig, run_dir: Path, task) -> dict:
    """SFT only: the warm-up on the grown labeled set, scored on the test slice."""
    path = run_dir / "sft.json"
    if path.exists():
        return json.loads(path.read_text())
    backend = _backend(run_dir)
    model = propagate.warm_up(backend, backend.default_model, task.labeled, config.finetune,
                              style=config.prompt_style, key=f"{run_dir.name}-warmup")
    records: list[Prediction] = []
    evaluate.predict(backend, model, task.test, style=config.prompt_style,
                     max_tokens=config.max_tokens, batch_size=config.generation_batch,
                     on_records=lambda batch, usage: records.extend(batch), quiet=True)
    scores = evaluate.metrics(records, task.test)
    atomic_write_json(path, scores)
    return scores


def _spread(values) -> dict:
    values = [v for v in values if v is not None]
    return {"mean": statistics.mean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}


def _summary(rows: list[dict], args, n_test: int) -> dict:
    strategies = list(dict.fromkeys(r["strategy"] for r in rows))
    table = {s: {m: _spread(r[m] for r in rows if r["strategy"] == s)
                 for m in ("sft", "sft_f1", "semievol", "semievol_f1")} for s in strategies}
    start = {m: _spread({r["seed"]: r[m] for r in rows}.values())
             for m in ("start_sft", "start_semievol")}
    print(f"\nfpb: {args.labeled} labels + {args.add} chosen by each strategy (oracle answers); "
          f"pool of {args.pool} unlabeled, {n_test} test questions, seeds {args.seeds}")
    print(f"start ({args.labeled} labels): SFT {_fmt(start['start_sft'])}, "
          f"SemiEvol {_fmt(start['start_semievol'])}")
    print(f"{'strategy':14} {'SFT acc':>14} {'SFT F1':>14} {'SemiEvol acc':>14} {'SemiEvol F1':>14}")
    for s, row in table.items():
        print(f"{s:14} " + " ".join(f"{_fmt(row[m]):>14}" for m in
                                    ("sft", "sft_f1", "semievol", "semievol_f1")))
    return {"task": "fpb", "labeled": args.labeled, "added": args.add, "pool": args.pool,
            "test": n_test, "seeds": args.seeds, "start": start, "strategies": table,
            "rows": rows}


def _fmt(s: dict) -> str:
    if s["mean"] is None:
        return "-"
    return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['sd']:.1f}" if s["sd"] is not None else "")


if __name__ == "__main__":
    main()
