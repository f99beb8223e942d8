"""Retrieval at scale: exact (flat) inner-product search against an IVF index, on random
unit vectors, with IVF's recall of the exact k nearest.

    python benchmarks/knn.py [--pools 10000,100000,1000000] [--queries 10000] [--dim 576]

Prints a table; the last line is one JSON object with, per pool size, the seconds of each
index (build + search) and IVF's recall@k. semievol.knn switches to IVF above the pool size
where it wins (knn.EXACT_UP_TO).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from semievol import knn


def unit(rows: int, dim: int, rng) -> np.ndarray:
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    # clustered like real embeddings: a few hundred topics plus noise
    centres = rng.standard_normal((256, dim), dtype=np.float32)
    x = centres[rng.integers(0, 256, rows)] + 0.6 * x
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pools", default="10000,100000,1000000")
    p.add_argument("--queries", type=int, default=10000)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--k", type=int, default=3)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    queries = unit(args.queries, args.dim, rng)
    rows = []
    print("load average (1, 5, 15 min) at the start: %.1f %.1f %.1f" % os.getloadavg())
    print(f"{'pool':>10} {'exact s':>9} {'ivf s':>9} {'speed-up':>9} {'recall@k':>9}")
    for size in [int(s) for s in args.pools.split(",")]:
        keys = unit(size, args.dim, rng)
        start = time.perf_counter()
        exact = knn.nearest(keys, queries, args.k, method="exact")
        t_exact = time.perf_counter() - start
        start = time.perf_counter()
        approx = knn.nearest(keys, queries, args.k, method="ivf")
        t_ivf = time.perf_counter() - start
        recall = float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))
        rows.append({"pool": size, "exact_s": round(t_exact, 2), "ivf_s": round(t_ivf, 2),
                     "recall": round(recall, 4)})
        print(f"{size:>10,} {t_exact:>9.2f} {t_ivf:>9.2f} {t_exact / t_ivf:>8.1f}x {recall:>9.4f}",
              flush=True)
    print("load average (1, 5, 15 min) at the end: %.1f %.1f %.1f" % os.getloadavg())
    summary = {"dim": args.dim, "queries": args.queries, "k": args.k, "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
