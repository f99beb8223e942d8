"""The pipeline's own cost per unlabeled item as the unlabeled set grows: the fake backend
(no model), the paper recipe (retrieval on), on the synthetic ticket task.

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--labeled 64] [--test 200]

Each size runs in a fresh process, so its peak memory (max RSS) is its own. Prints a table;
the last line is one JSON object with per-item microseconds and peak MiB for each size, and
the ratio of per-item time at the largest size to the smallest.
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


def one(size: int, labeled: int, test: int) -> dict:
    """Run the pipeline on ``size`` unlabeled items in this process; its figures."""
    from semievol import RunConfig, load_backend
    from semievol.demo import make_task
    from semievol.pipeline import run

    with tempfile.TemporaryDirectory() as tmp:
        data = make_task(Path(tmp) / "data", sizes={"labeled": labeled, "unlabeled": size,
                                                    "test": test})
        config = RunConfig.recipe("paper", data=str(data), backend="fake", prompt_style="text")
        start = time.perf_counter()
        results = run(config, load_backend("fake", rule=rule), Path(tmp) / "run", quiet=True)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"size": size, "seconds": round(seconds, 2),
            "us_per_item": round(1e6 * seconds / size, 1), "peak_mib": round(peak, 1),
            "selected": results["unlabeled"]["selected"],
            "stages_s": {k: round(v, 2) for k, v in results["timings_s"].items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--labeled", type=int, default=64)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process's size
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.labeled, args.test)))
        return {}

    rows = []
    print("load average (1, 5, 15 min) at the start: %.1f %.1f %.1f" % os.getloadavg())
    print(f"{'unlabeled':>10} {'seconds':>9} {'us/item':>9} {'peak MiB':>9}  slowest stages")
    for size in [int(s) for s in args.sizes.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", str(size), "--labeled",
                              str(args.labeled), "--test", str(args.test)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        slow = sorted(row["stages_s"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{size:>10,} {row['seconds']:>9.1f} {row['us_per_item']:>9.1f} "
              f"{row['peak_mib']:>9.0f}  " + ", ".join(f"{k} {v:.1f}s" for k, v in slow),
              flush=True)
    print("load average (1, 5, 15 min) at the end: %.1f %.1f %.1f" % os.getloadavg())
    summary = {"rows": [{k: r[k] for k in ("size", "us_per_item", "peak_mib")} for r in rows],
               "per_item_ratio_largest_to_smallest":
                   round(rows[-1]["us_per_item"] / rows[0]["us_per_item"], 2)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
