"""Retrieval: exact search finds the true neighbours, IVF (for large pools) nearly all."""
from __future__ import annotations

import faiss
import numpy as np

from semievol import knn


def unit(rows, dim, rng):
    centres = rng.standard_normal((32, dim), dtype=np.float32)
    x = centres[rng.integers(0, 32, rows)] + 0.6 * rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_search_is_brute_force_cosine():
    rng = np.random.default_rng(1)
    keys, queries = unit(500, 16, rng), unit(50, 16, rng)
    found = knn.nearest(keys, queries, 3)
    truth = np.argsort(-(queries @ keys.T), axis=1)[:, :3]
    assert found == truth.tolist()


def test_ivf_recalls_most_exact_neighbours_and_auto_picks_by_size():
    rng = np.random.default_rng(2)
    keys, queries = unit(20_000, 32, rng), unit(300, 32, rng)
    exact = knn.nearest(keys, queries, 3, method="exact")
    approx = knn.nearest(keys, queries, 3, method="ivf")
    recall = np.mean([len(set(a) & set(e)) / 3 for a, e in zip(approx, exact)])
    assert recall > 0.9
    assert isinstance(knn.index(keys), faiss.IndexFlatIP)             # auto: exact here
    big = unit(knn.EXACT_UP_TO + 1, 8, rng)
    assert isinstance(knn.index(big), faiss.IndexIVFFlat)             # and IVF past it


def test_fewer_keys_than_k_and_no_queries():
    keys = unit(2, 8, np.random.default_rng(3))
    assert [len(r) for r in knn.nearest(keys, keys, 5)] == [2, 2]
    assert knn.nearest(keys, keys[:0], 3) == []
    assert knn.nearest(keys[:0], keys, 3) == [[], []]
