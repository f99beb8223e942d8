"""Knowledge propagation from labeled to unlabeled data (paper section 3.2).

In weight (IWP): M_warm = FT(M_base, D_L). In context (ICP): each unlabeled question gets
its k nearest labeled examples (cosine over embeddings, faiss) as solved examples."""
from __future__ import annotations

from collections.abc import Sequence

from . import knn, prompts
from .backends import Backend
from .config import FinetuneConfig
from .types import Example, ModelRef, Usage


def warm_up(backend: Backend, base: str, labeled: Sequence[Example], config: FinetuneConfig,
            *, style: str, key: str) -> ModelRef:
    """In-weight propagation: fine-tune the base model on the labeled set."""
    examples = [prompts.training_example(e, e.answer, style) for e in labeled]
    return backend.finetune(base, examples, config, key=key)


EMBED_CHUNK = 8192
"""Unlabeled questions embedded (and searched) at a time, so memory does not grow with the
unlabeled set: 8192 x 576 float32 is 19 MB for the embedded model."""


def retrieve(backend: Backend, labeled: Sequence[Example], unlabeled: Sequence[Example],
             k: int) -> tuple[dict[str, list[str]], Usage]:
    """In-context propagation: unlabeled id -> ids of its k nearest labeled examples; and
    the tokens the embeddings used."""
    if k == 0 or not labeled or not unlabeled:
        return {u.id: [] for u in unlabeled}, Usage()
    vectors = backend.embed([e.question for e in labeled])
    keys, usage = knn.index(vectors), Usage() + vectors.usage
    neighbours = {}
    for start in range(0, len(unlabeled), EMBED_CHUNK):
        chunk = unlabeled[start:start + EMBED_CHUNK]
        queries = backend.embed([u.question for u in chunk])
        usage += queries.usage
        found = knn.search(keys, queries, k)
        neighbours.update((u.id, [labeled[i].id for i in row]) for u, row in zip(chunk, found))
    return neighbours, usage
