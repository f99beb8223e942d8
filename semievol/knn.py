"""Nearest labeled examples by cosine similarity, with faiss (exact inner product over
L2-normalised vectors)."""
from __future__ import annotations

import faiss
import numpy as np


def nearest(keys: np.ndarray, queries: np.ndarray, k: int) -> list[list[int]]:
    """For each query row, the indices of the k most similar key rows (most similar
    first). Rows must be L2-normalised, so inner product is cosine similarity."""
    k = min(k, len(keys))
    if k == 0 or len(queries) == 0:
        return [[] for _ in range(len(queries))]
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(np.ascontiguousarray(keys, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return [[int(i) for i in row if i >= 0] for row in ids]
