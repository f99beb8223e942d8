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

import math
import random
from collections import defaultdict
from collections.abc import Sequence

from . import answers, evaluate, selection
from .types import Example, PseudoLabel

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


def significantly_better(challenger: dict[str, bool], incumbent: dict[str, bool],
                         alpha: float = 0.05) -> bool:
    """Whether the challenger's answers (question id -> right) beat the incumbent's on the
    same questions by more than chance: an exact one-sided sign test on the questions only
    one of them got right (McNemar's exact test). On fpb's 13-question slice one question
    (p = 0.5) is not evidence; five to none (p = 0.03) is."""
    wins = sum(challenger[q] and not incumbent[q] for q in challenger)
    losses = sum(incumbent[q] and not challenger[q] for q in challenger)
    n = wins + losses
    p = sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n
    return wins > losses and p < alpha


# --- recipe 'auto': settings chosen on the validation slice ---------------------------

MINING = [{"icp": False, "justify": "vote"}, {"icp": False, "justify": "model"},
          {"icp": True, "justify": "vote"}, {"icp": True, "justify": "model"}]
"""How the unlabeled questions are mined, in the order that wins ties: the 'small'
recipe's first (no retrieved examples, votes: the cheapest), the paper's last."""


def judge(records: Sequence[PseudoLabel], held: Sequence[Example], theta: float) -> dict:
    """What one mining setting's pseudo-labels of the validation questions are worth:
    which questions they got right, their accuracy (an unlabeled question counts as
    wrong), and for each selection (global, per class) the accuracy and macro-F1 of what
    it keeps. Macro-F1 because a selection that keeps one class (fpb's global threshold
    kept only 'neutral') can be accurate and still teach the model to answer nothing else."""
    by_id = {ex.id: ex for ex in held}
    right = {ex.id: False for ex in held}
    right.update({r.id: answers.is_correct(r.pseudo_label, by_id[r.id]) for r in records})
    out = {"accuracy": sum(right.values()) / len(held) if held else 0.0, "right": right}
    for name, per_class in (("per_class", True), ("global", False)):
        kept, _ = selection.select(records, theta, per_class=per_class)
        f1 = evaluate.macro_f1([by_id[r.id].answer for r in kept], [r.pseudo_label for r in kept])
        out[name] = {"kept": len(kept), "macro_f1": f1,
                     "accuracy": sum(right[r.id] for r in kept) / len(kept) if kept else 0.0}
    return out


def choose(tried: Sequence[dict]) -> dict:
    """The settings to mine and select with: the first mining listed (the 'small'
    recipe's) unless another's pseudo-labels of the validation questions are significantly
    more often right (significantly_better; of several, the most accurate, the first listed
    on a tie: on fpb's seed 1, 11 right of 13 against 10 chose the model's settling, which
    is no evidence), then the selection whose kept pseudo-labels have the higher macro-F1
    (per class on a tie)."""
    default, *others = tried
    better = [t for t in others if significantly_better(t["right"], default["right"])]
    best = max(better, key=lambda t: t["accuracy"], default=default)  # max: the first listed
    per_class = best["per_class"]["macro_f1"] >= best["global"]["macro_f1"]
    return {**best["settings"], "per_class": per_class}


def recipe_report(saved: dict, timings: dict[str, float]) -> dict:
    """results.json's ``recipe``: what 'auto' chose, what each candidate scored, and what
    choosing cost over a fixed recipe: the probing of the validation questions, the evolve
    that was not kept and the validation scores of both evolves (seconds)."""
    unkept = "evolve_r1_alone" if saved["chosen"].get("replay_labeled", True) else "evolve_r1_replay"
    extra = [name for name in timings if name.startswith("choose_") or name == unkept
             or name in ("eval_validation_r1_replay", "eval_validation_r1_alone")]
    return {"name": "auto", **saved, "cost_s": round(sum(timings[n] for n in extra), 3),
            "cost_stages": extra}
