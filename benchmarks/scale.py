"""The pipeline's own cost per unlabeled item as the unlabeled set grows: the fake backend
(no model), the paper recipe (retrieval on), on the synthetic ticket task.

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--labeled 64] [--test 200]
                               [--repeats 3]

Each run is a fresh process, so its peak memory (max RSS) is its own. The backend is wrapped
to time its calls: the rest of a run's wall time is the pipeline's own overhead (loading,
retrieval, bookkeeping, selection, the run directory), reported per item. Prints a table of
the median of ``--repeats`` runs a size; the last line is one JSON object with, for each
size, the per-item microseconds (all, and the overhead alone, with their spread) and peak
MiB, and the ratio of per-item time at the largest size to the smallest.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rule(call):
    """A model right about 80% of the time, surer when right; self-justify takes the first
    candidate. Deterministic in the question, sample and seed."""
    from semievol.demo import PROBLEMS, TEAMS
    from semievol.types import Generation

    ticket = call.user.split("Ticket:")[-1].lower()
    truth = next((t for t, ps in PROBLEMS.items() if any(p.lower() in ticket for p in ps)), TEAMS[0])
    u = int.from_bytes(hashlib.blake2b(f"{call.user}|{call.sample}|{call.seed}".encode(),
                                       digest_size=8).digest(), "little") / 2**64
    answer = truth if u < 0.8 else TEAMS[(TEAMS.index(truth) + 1) % 3]
    return Generation(answer, (answer,), (-0.1 - u if answer == truth else -1.0 - u,))


class Timed:
    """A backend whose model calls are timed: ``seconds`` inside them, in all."""

    CALLS = frozenset({"finetune", "generate_with_logprobs", "embed"})

    def __init__(self, backend):
        self.backend, self.seconds = backend, 0.0

    def __getattr__(self, name):
        value = getattr(self.backend, name)
        if name not in self.CALLS:
            return value

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return value(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def one(size: int, labeled: int, test: int) -> dict:
    """Run the pipeline on ``size`` unlabeled items in this process; its figures."""
    from semievol import RunConfig, load_backend
    from semievol.demo import make_task
    from semievol.pipeline import run

    with tempfile.TemporaryDirectory() as tmp:
        data = make_task(Path(tmp) / "data", sizes={"labeled": labeled, "unlabeled": size,
                                                    "test": test})
        config = RunConfig.recipe("paper", data=str(data), backend="fake", prompt_style="text")
        backend = Timed(load_backend("fake", rule=rule))
        start = time.perf_counter()
        results = run(config, backend, Path(tmp) / "run", quiet=True)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"size": size, "seconds": round(seconds, 2),
            "us_per_item": round(1e6 * seconds / size, 1),
            "overhead_us_per_item": round(1e6 * (seconds - backend.seconds) / size, 1),
            "peak_mib": round(peak, 1),
            "selected": results["unlabeled"]["selected"],
            "stages_s": {k: round(v, 2) for k, v in results["timings_s"].items()}}


SPREAD = ("us_per_item", "overhead_us_per_item", "peak_mib")
"""The figures given for every run of a size, beside the median run's."""


def child(size: int, args) -> dict:
    """One run of ``size`` items in a fresh process: its figures (``one``)."""
    done = subprocess.run([sys.executable, __file__, "--one", str(size), "--labeled",
                           str(args.labeled), "--test", str(args.test)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--labeled", type=int, default=64)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3, help="runs a size (the median is shown)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process's size
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.labeled, args.test)))
        return {}

    rows = []
    print("load average (1, 5, 15 min) at the start: %.1f %.1f %.1f" % os.getloadavg())
    print(f"{'unlabeled':>10} {'seconds':>9} {'us/item':>9} {'overhead':>9} {'peak MiB':>9}"
          "  slowest stages (median of %d runs)" % args.repeats)
    for size in [int(s) for s in args.sizes.split(",")]:
        runs = [child(size, args) for _ in range(args.repeats)]
        row = {**sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2],
               **{f"{key}_all": [r[key] for r in runs] for key in SPREAD}}
        rows.append(row)
        slow = sorted(row["stages_s"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{size:>10,} {row['seconds']:>9.1f} {row['us_per_item']:>9.1f} "
              f"{row['overhead_us_per_item']:>9.1f} {row['peak_mib']:>9.0f}  "
              + ", ".join(f"{k} {v:.1f}s" for k, v in slow), flush=True)
    print("load average (1, 5, 15 min) at the end: %.1f %.1f %.1f" % os.getloadavg())
    keys = ("size", *SPREAD, *(f"{key}_all" for key in SPREAD))
    summary = {"rows": [{k: r[k] for k in keys} for r in rows],
               "per_item_ratio_largest_to_smallest":
                   round(rows[-1]["us_per_item"] / rows[0]["us_per_item"], 2)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
