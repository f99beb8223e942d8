"""Nearest labeled examples by cosine similarity, with faiss (inner product over
L2-normalised vectors).

Exact search up to ``EXACT_UP_TO`` keys; past it an inverted-file index (IVF: k-means
cells, searching the ``NPROBE`` nearest cells per query), whose cost grows with the square
root of the pool instead of the pool. ``benchmarks/knn.py`` measures both, and IVF's recall
of the exact neighbours, at each size (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math

import faiss
import numpy as np

EXACT_UP_TO = 100_000
"""Pools up to this many keys are searched exactly. Measured (benchmarks/knn.py, 2 cores,
dimension 576): IVF was slower at 10k keys, 1.5x faster at 50k with recall@3 of .91, 2.8x
at 200k with .98."""

NPROBE = 16
"""Cells searched per query in IVF."""


def index(keys: np.ndarray, *, method: str = "auto") -> faiss.Index:
    """A search index over L2-normalised key rows: "exact", "ivf", or "auto" (exact up to
    ``EXACT_UP_TO`` keys). Build it once, search it with :func:`search` many times."""
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if method == "auto":
        method = "exact" if len(keys) <= EXACT_UP_TO else "ivf"
    found = _ivf(keys) if method == "ivf" else faiss.IndexFlatIP(keys.shape[1])
    found.add(keys)
    return found


def search(found: faiss.Index, queries: np.ndarray, k: int) -> list[list[int]]:
    """For each query row, the indices of the k most similar keys (most similar first).
    Rows are L2-normalised, so inner product is cosine similarity."""
    k = min(k, found.ntotal)
    if k == 0 or len(queries) == 0:
        return [[] for _ in range(len(queries))]
    _, ids = found.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return [[int(i) for i in row if i >= 0] for row in ids]


def nearest(keys: np.ndarray, queries: np.ndarray, k: int, *,
            method: str = "auto") -> list[list[int]]:
    """:func:`search` over a fresh :func:`index` of ``keys``."""
    if len(keys) == 0:
        return [[] for _ in range(len(queries))]
    return search(index(keys, method=method), queries, k)


def _ivf(keys: np.ndarray) -> faiss.Index:
    """An IVF index of about sqrt(N) cells, trained on 64 keys per cell (a fixed sample)."""
    cells = max(1, min(int(math.sqrt(len(keys))), len(keys) // 64))
    quantizer = faiss.IndexFlatIP(keys.shape[1])
    ivf = faiss.IndexIVFFlat(quantizer, keys.shape[1], cells, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(len(keys), min(len(keys), 64 * cells),
                                             replace=False)
    ivf.train(keys[np.sort(sample)])
    ivf.nprobe = min(NPROBE, cells)
    return ivf
