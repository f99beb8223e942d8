"""The guard: a validation slice of the labeled data decides which model the run hands
back, so SemiEvol never returns a model that its own warm-up measurably beats.

The paper holds out nothing; practitioners hold out a dev set. With 64 fpb labels the
paper's settings evolved a model that answered one class to everything (SemiEvol 60.3
against SFT 85.2), and nothing in the run said so. Here a stratified slice of the labeled
set is kept out of every fine-tune and every retrieval pool, and each evolved model is
compared with the model it would replace (the warm-up, then the previous round).

The evidence: 0/1 accuracy on a dozen questions moves 7.7 points a question, so the 2-6
point gains SemiEvol makes on fpb can never show, and "a tie keeps SFT" threw every one of
them away (regret 3.4 points over three labeled samples). Instead each model answers each
validation question ``SAMPLES`` times at temperature 1, which estimates how much
probability it puts on every answer on any backend (all of them sample; teacher-forced
scores would need a fourth Backend method, and answer-token logprobs only see the answer
the model gave). Each question is scored with the Brier score, a proper scoring rule
(log-loss is infinite wherever no sample was right), and the two models are compared
question by question: the mean paired difference, a 90% interval, and an exact
sign-flip randomization test (``compare``). The continuous score sees what 0/1 cannot.
Measured with ``benchmarks/guard.py`` (bootstrap slices of each run's 13 questions): on the
fpb collapse (the paper recipe, 64 labels; mean Brier 1.40 against the warm-up's 0.72) this
test flags harm on 85% of slices, the exact sign test on 0/1 answers on 16%; on the three
fpb runs of the default recipe with 64 labels, where SemiEvol was 0 to 3.7 points ahead of
SFT on test, it flags harm (a false alarm) on at most 2%. Over the six runs of that panel
the rule's mean regret is 0.1 points against the old rule's 0.3 (RESULTS.md, guard.py).

The rule: the evolved model is what the method promises, so it is handed back unless the
slice gives evidence that it is worse (one-sided p < ``ALPHA``; the interval then lies
above zero). Rounds stop on the same evidence. A model no better and no worse is kept:
its expected cost is small, a collapse's is large, and the slice can see the collapse.

How big: ``DEFAULT_SHARE`` of the labeled set, at least ``FLOOR`` and at most ``CAP``
examples, and none under ``MIN_LABELED`` labels.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from . import answers, evaluate, prompts, selection
from .types import Example, PseudoLabel, Usage

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


SAMPLES = 16
"""Answers sampled per validation question, at temperature 1: each answer's share of them
estimates the probability the model puts on it (to 0.125 at worst, one standard error)."""
ALPHA = 0.05
"""One-sided level of the evidence of harm: the 90% interval of the difference lies above 0."""


def brier(sampled: Sequence[str | None], example: Example) -> dict:
    """What one model's sampled answers to one question say: the share that is right and
    the question's Brier score (0 best, 2 worst), ``sum_c (p_c - [c right])**2`` over the
    answers given (no answer is one more answer), with each ``p_c**2`` estimated without
    bias from its count, ``k(k-1) / (n(n-1))``, so a model is not penalised for the noise of
    sampling (the plain estimate adds ``(1 - sum p_c**2) / n``, more to the less sure)."""
    n = len(sampled)
    correct = [answers.is_correct(a, example) for a in sampled]
    right = sum(correct)
    # the right answer is one answer however it is written; wrong ones by their text
    counts = Counter(True if ok else (a or "").strip().lower() for a, ok in zip(sampled, correct))
    squares = sum(k * (k - 1) for k in counts.values()) / (n * (n - 1)) if n > 1 else 1.0
    return {"id": example.id, "answers": dict(Counter(map(str, sampled)).most_common()),
            "p_right": right / n, "brier": 1 - 2 * right / n + squares}


def sample(backend, model: str, held: Sequence[Example], *, style: str, max_tokens: int,
           seed: int, batch_size: int) -> tuple[list[dict], Usage]:
    """``model``'s evidence on the validation slice: ``SAMPLES`` answers to each question
    at temperature 1 (one prompt shared by its samples), scored by ``brier``."""
    records, used = [], Usage()
    for start in range(0, len(held), batch_size):
        batch = held[start:start + batch_size]
        out = backend.generate_with_logprobs(model, [prompts.question_prompt(ex, style) for ex in batch],
                                             n=SAMPLES, temperature=1.0, max_tokens=max_tokens,
                                             seed=seed)
        records += [brier([answers.extract(g.text, ex) for g in gens], ex)
                    for ex, gens in zip(batch, out)]
        used += out.usage
    return records, used


def _signs(n: int) -> np.ndarray:
    """Sign vectors of the randomization test: all 2**n for up to 16 questions, else
    20,000 drawn with a fixed seed plus the observed one (so p is never 0)."""
    if n <= 16:
        return ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2.0 - 1.0
    draws = np.random.default_rng(0).choice([-1.0, 1.0], size=(20_000, n))
    return np.vstack([np.ones(n), draws])


def _p_above(d: np.ndarray, signs: np.ndarray) -> float:
    """P(mean >= the observed mean) when each difference's sign is a coin toss."""
    return float(np.mean(signs @ d >= d.sum() - 1e-9))


def compare(candidate: Sequence[dict], incumbent: Sequence[dict], alpha: float = ALPHA) -> dict:
    """Whether the slice shows ``candidate`` worse than ``incumbent`` (per-question
    ``brier`` records of the same questions): the mean paired difference of their Brier
    scores (positive: the candidate is worse), its 90% interval (inverting the test: the
    shifts it does not reject), and the one-sided p of harm by an exact sign-flip
    randomization test, which assumes nothing of the differences' distribution (the
    collapse's are lopsided: a few near 1, the rest near 0)."""
    mine = {r["id"]: r for r in candidate}
    pairs = [(mine[r["id"]], r) for r in incumbent if r["id"] in mine]
    d = np.array([c["brier"] - i["brier"] for c, i in pairs])
    signs = _signs(len(d))
    p_harm = _p_above(d, signs) if len(d) else 1.0

    def bound(side: float) -> float:  # the shift where the one-sided test stops rejecting
        lo, hi = (float(d.min()) - 1, float(d.max()) + 1) if len(d) else (0.0, 0.0)
        for _ in range(40):
            mid = (lo + hi) / 2
            rejects = _p_above(side * (d - mid), signs) < alpha
            lo, hi = (mid, hi) if rejects == (side > 0) else (lo, mid)
        return round((lo + hi) / 2, 4)

    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs) if rs else None
    cand, inc = [c for c, _ in pairs], [i for _, i in pairs]
    return {"n": len(d), "difference": float(d.mean()) if len(d) else 0.0,
            "interval": [bound(1.0), bound(-1.0)] if len(d) else [0.0, 0.0],
            "p_harm": p_harm, "harm": p_harm < alpha,
            "brier": [mean("brier", cand), mean("brier", inc)],
            "p_right": [mean("p_right", cand), mean("p_right", inc)]}


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
