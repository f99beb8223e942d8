"""Knowledge propagation from labeled to unlabeled data (paper section 3.2).

In weight (IWP): M_warm = FT(M_base, D_L). In context (ICP): each unlabeled question gets
its k nearest labeled examples (cosine over embeddings, faiss) as solved examples."""
from __future__ import annotations

from collections.abc import Sequence

from . import knn, prompts
from .backends import Backend
from .config import FinetuneConfig
from .types import Example


def warm_up(backend: Backend, base: str, labeled: Sequence[Example], config: FinetuneConfig,
            *, style: str, key: str) -> str:
    """In-weight propagation: fine-tune the base model on the labeled set."""
    examples = [prompts.training_example(e, e.answer, style) for e in labeled]
    return backend.finetune(base, examples, config, key=key)


def retrieve(backend: Backend, labeled: Sequence[Example], unlabeled: Sequence[Example],
             k: int) -> dict[str, list[str]]:
    """In-context propagation: unlabeled id -> ids of its k nearest labeled examples."""
    if k == 0 or not labeled or not unlabeled:
        return {u.id: [] for u in unlabeled}
    vectors = backend.embed([e.question for e in labeled] + [u.question for u in unlabeled])
    found = knn.nearest(vectors[: len(labeled)], vectors[len(labeled):], k)
    return {u.id: [labeled[i].id for i in row] for u, row in zip(unlabeled, found)}
