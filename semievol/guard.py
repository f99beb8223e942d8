"""The guard: a validation slice of the labeled data decides, so SemiEvol never hands back a
model worse than its own warm-up.

The paper holds out nothing; practitioners hold out a dev set. With 64 fpb labels the
paper's settings evolved a model that answered one class to everything (SemiEvol 60.3
against SFT 85.2), and nothing in the run said so. Here a stratified slice of the labeled
set is kept out of every fine-tune and every retrieval pool; after each round the warm-up
(SFT) and the evolved model are scored on it, the better one is the run's final model (SFT
on a tie), and rounds stop when the score stops improving.

How big: ``DEFAULT_SHARE`` of the labeled set, at least ``FLOOR`` and at most ``CAP``
examples, and none under ``MIN_LABELED`` labels. A slice of n questions measures accuracy
to about 0.5/sqrt(n) (14 points at n=13, fpb's 64 labels): too coarse to rank close
settings, fine to catch the collapses the guard is for (25 points on fpb). A larger slice
costs training labels, and beyond ``CAP`` (3.5 points) it buys little.
"""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from .types import Example

DEFAULT_SHARE = 0.2
FLOOR = 8
CAP = 200
MIN_LABELED = 16
"""Fewer labels than this: no validation slice by default (the warm-up needs them all)."""


def size(requested: int | None, labeled: int) -> int:
    """The validation slice's size: ``requested`` (``RunConfig.validation``; 0 = none) or,
    when None, the default share with its floor and cap. Always leaves labels to train on."""
    if requested is None:
        if labeled < MIN_LABELED:
            return 0
        requested = min(CAP, max(FLOOR, round(DEFAULT_SHARE * labeled)))
    return min(requested, max(0, labeled - 1))


def split(labeled: Sequence[Example], n: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): ``n`` examples taken with the answers in their proportions
    (largest remainders), the same for the same seed; both keep the file order."""
    if n <= 0:
        return list(labeled), []
    rng = random.Random(seed)
    by_answer: dict[str, list[Example]] = defaultdict(list)
    for ex in labeled:
        by_answer[ex.answer].append(ex)
    classes = sorted(by_answer)
    quota = {c: n * len(by_answer[c]) / len(labeled) for c in classes}
    take = {c: int(quota[c]) for c in classes}
    spare = n - sum(take.values())
    for c in sorted(classes, key=lambda c: (take[c] - quota[c], rng.random()))[:spare]:
        take[c] += 1
    held = set()
    for c in classes:
        group = [ex.id for ex in by_answer[c]]
        rng.shuffle(group)
        held.update(group[:take[c]])
    return ([ex for ex in labeled if ex.id not in held],
            [ex for ex in labeled if ex.id in held])


def best(scores: dict[str, dict], among=None) -> str:
    """The label of the best-scoring model (of those in ``among``, if given), the first
    on a tie: the warm-up is scored first, so it wins ties and evolving must earn its place."""
    scores = {k: v for k, v in scores.items() if among is None or k in among}
    top = max(s["accuracy"] for s in scores.values())
    return next(label for label, s in scores.items() if s["accuracy"] == top)
