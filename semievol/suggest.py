"""What to label next: rank a finished run's unlabeled items by how much a human label
would help, from what the run directory already holds.

The run's collaborate stage (``collaborate_r<round>.jsonl``) has, for each mined question,
the n inferences' answers, each response's entropy, whether they agreed or self-justify
(or the vote) had to settle them, and the pseudo-label with its entropy. Strategies:

    random        a seeded shuffle: the baseline every other strategy must beat
    entropy       the highest pseudo-label entropy first (no pseudo-label: first of all)
    disagreement  the most split vote among the n answers first (ties: higher entropy)
    combined      uncertainty (0.7 x the entropy's percentile rank + 0.3 x the
                  disagreement's: on fpb seed 0 entropy found more of the wrong
                  pseudo-labels, 21 of 32 picks against disagreement's 14) weighted by
                  diversity (greedy k-center over question embeddings: far from the labeled
                  questions and from those already chosen; near-duplicates never both) and
                  by class balance (pseudo-label classes thin among the labels weigh more)

Embeddings are the backend's (``Backend.embed``), computed once per run directory and kept
in ``suggest_embeddings.npz`` beside the run's files (the pipeline does not keep its own).
Only questions still in the data's unlabeled split are ranked, so a suggestion made after
``import-labels`` skips what was labeled since.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import RunConfig
from .data import find_split, load_split
from .errors import ConfigError
from .rundir import RunDir, stream_jsonl
from .types import Example

STRATEGIES = ("random", "entropy", "disagreement", "combined")
DEFAULT_STRATEGY = "combined"
"""What ``semievol suggest`` uses without --strategy. Not yet backed by benchmarks/active.py:
on fpb seed 0 (31 labels + 32, 120 test questions) its labels gave SFT 81.7% and SemiEvol
86.7% against random labels' 83.3% and 86.7% (two questions either way: noise), while it
chose 18 of the pool's 35 wrong pseudo-labels to random's 8 and a balanced class mix
(5/17/10 against 2/25/5). Revisit when the three seeds are in RESULTS.md."""
NEAR_DUPLICATE = 0.95
"""Cosine similarity (of the centred embeddings) above which two questions count as the
same question said twice."""


@dataclass(frozen=True)
class Candidate:
    """One unlabeled question, what the run made of it, and why it is suggested."""

    example: Example
    answers: tuple[str | None, ...]
    """The n inferences' extracted answers (None: none found)."""
    responses: tuple[str, ...]
    pseudo_label: str | None
    entropy: float | None
    settled: bool
    """The inferences disagreed and self-justify (or the vote) chose the pseudo-label."""
    reason: str = ""

    @property
    def agreement(self) -> float:
        """Share of the n inferences that gave the most common answer (1: all agree; an
        inference that found no answer agrees with none)."""
        votes = Counter(a for a in self.answers if a is not None)
        return max(votes.values()) / len(self.answers) if votes else 0.0

    @property
    def score(self) -> float:
        """The run's confidence in its pseudo-label, in (0, 1]: exp(-entropy) times the
        share of inferences that agree with it (0 without a pseudo-label)."""
        if self.pseudo_label is None:
            return 0.0
        agree = sum(a == self.pseudo_label for a in self.answers) / max(1, len(self.answers))
        return round(math.exp(-(self.entropy or 0.0)) * agree, 4)


def candidates(run_dir: str | Path, data: str | Path | None = None) -> tuple[list[Candidate], RunConfig]:
    """The run's mined questions still in the unlabeled split (of ``data``, else the data
    the run was made on), each from the last round that mined it."""
    rd = Path(run_dir)
    if not (rd / "config.json").exists():
        raise ConfigError(f"{rd} is not a run directory (no config.json)")
    config = RunConfig.load(rd / "config.json")
    rounds = sorted(rd.glob("collaborate_r*.jsonl"), key=lambda p: int(p.stem.rsplit("r", 1)[1]))
    if not rounds:
        raise ConfigError(f"{rd} has no collaborate stage yet: run it past collaborate first")
    mined = {rec["id"]: rec for path in rounds for rec in stream_jsonl(path)}
    folder = Path(data or config.data)
    unlabeled = load_split(find_split(folder, "unlabeled"), split="unlabeled", require_answer=False)
    out = []
    for ex in unlabeled:
        rec = mined.get(ex.id)
        if rec is None:
            continue
        out.append(Candidate(ex, tuple(rec["answers"]), tuple(rec["responses"]),
                             rec.get("pseudo_label"), rec.get("entropy"),
                             bool(rec.get("justified"))))
    return out, config


def rank(items: list[Candidate], k: int, strategy: str = DEFAULT_STRATEGY, *,
         labeled: list[Example] = (), embed=None, seed: int = 0) -> list[Candidate]:
    """The ``k`` items to label first, best first, each with the reason it was chosen.
    ``embed(texts) -> (len, d) L2-normalised array`` is needed by 'combined' only."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}")
    if strategy == "random":
        order = list(items)
        random.Random(seed).shuffle(order)
        return [_why(c, "chosen at random (baseline)") for c in order[:k]]
    entropy = _percentiles([_entropy(c) for c in items])
    split = _percentiles([1 - c.agreement for c in items])
    if strategy == "entropy":
        order = sorted(range(len(items)), key=lambda i: -_entropy(items[i]))
        return [_why(items[i], _uncertain(items[i])) for i in order[:k]]
    if strategy == "disagreement":
        order = sorted(range(len(items)), key=lambda i: (items[i].agreement, -_entropy(items[i])))
        return [_why(items[i], _uncertain(items[i])) for i in order[:k]]
    if embed is None:
        raise ConfigError("the 'combined' strategy needs embeddings (a backend)")
    uncertainty = 0.7 * entropy + 0.3 * split
    vectors = np.asarray(embed([c.example.question for c in items]))
    seen = np.asarray(embed([ex.question for ex in labeled])) if labeled \
        else np.zeros((0, vectors.shape[1]))
    vectors, seen = _centred(vectors, seen)
    classes = Counter(ex.answer for ex in labeled)
    return _k_center(items, uncertainty, vectors, seen, classes, k)


def _centred(vectors: np.ndarray, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets less their common mean, normalised again. A language model's pooled
    states share one large direction: on fpb every SmolLM2 question was within cosine
    distance 0.09 of a labeled one and 456 pairs of 128 passed 0.97 similarity; centred,
    the distances spread over 0.2-0.8 and no two distinct questions pass 0.95."""
    mean = np.concatenate([vectors, seen]).mean(axis=0)

    def centre(x):
        x = x - mean
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norms == 0, 1.0, norms)
    return centre(vectors), centre(seen)


def _k_center(items, uncertainty, vectors, seen, classes: Counter, k: int) -> list[Candidate]:
    """Greedy uncertainty-weighted k-center: each step takes the item that maximises
    uncertainty x distance to the nearest labeled or chosen question x class weight, and
    drops near-duplicates of what it took."""
    n = len(items)
    nearest = np.full(n, 2.0) if len(seen) == 0 else 1 - (vectors @ seen.T).max(axis=1)
    alive = np.ones(n, dtype=bool)
    chosen: list[Candidate] = []
    mean = (sum(classes.values()) / len(classes)) if classes else 1.0
    while len(chosen) < k and alive.any():
        weight = np.array([math.sqrt(mean / (1 + classes.get(c.pseudo_label, 0)))
                           if c.pseudo_label is not None and c.example.options else 1.0
                           for c in items])
        score = np.where(alive, (0.05 + uncertainty) * np.clip(nearest, 0, 2) * weight, -1)
        i = int(score.argmax())
        c = items[i]
        chosen.append(_why(c, f"{_uncertain(c)}; {'far from' if nearest[i] > 0.3 else 'unlike'} "
                           f"the labeled and chosen questions (cosine distance {nearest[i]:.2f})"
                           + (f"; class '{answer_text(c, c.pseudo_label)}' has "
                              f"{classes.get(c.pseudo_label, 0)} labels" if weight[i] > 1 else "")))
        if c.pseudo_label is not None:
            classes[c.pseudo_label] += 1
        similarity = vectors @ vectors[i]
        alive &= similarity < NEAR_DUPLICATE
        alive[i] = False
        nearest = np.minimum(nearest, 1 - similarity)
    return chosen


def _entropy(c: Candidate) -> float:
    return math.inf if c.pseudo_label is None or c.entropy is None else c.entropy


def _percentiles(values: list[float]) -> np.ndarray:
    """Each value's rank among them in [0, 1] (ties share the mean rank; inf is highest)."""
    if not values:
        return np.zeros(0)
    a = np.array(values, dtype=float)
    order = a.argsort(kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a))
    for v in set(values):  # ties share their mean rank
        mask = a == v
        ranks[mask] = ranks[mask].mean()
    return ranks / max(1, len(a) - 1)


def _uncertain(c: Candidate) -> str:
    if c.pseudo_label is None:
        return f"no pseudo-label: the {len(c.answers)} inferences found no answer"
    votes = ", ".join(f"{answer_text(c, a)} x{n}" for a, n in Counter(c.answers).most_common())
    how = "settled by self-justify" if c.settled else "agreed"
    return f"inferences {votes} ({how}); pseudo-label entropy {c.entropy:.3f}" \
        if c.entropy is not None else f"inferences {votes} ({how})"


def answer_text(c: Candidate, label: str | None) -> str:
    """An answer as its option text (multi-choice) or as given."""
    if label is None:
        return "none"
    ex = c.example
    if ex.options and len(label) == 1 and "A" <= label <= chr(ord("A") + len(ex.options) - 1):
        return ex.option_of(label)
    return label


def _why(c: Candidate, reason: str) -> Candidate:
    return replace(c, reason=reason)


def embedder(run_dir: Path, backend):
    """``embed(texts)`` through ``backend``, cached by text in ``suggest_embeddings.npz``
    so a run's questions are embedded once however often it is asked."""
    path = run_dir / "suggest_embeddings.npz"
    cache: dict[str, np.ndarray] = {}
    if path.exists():
        saved = np.load(path, allow_pickle=False)
        cache = dict(zip(saved["texts"].tolist(), saved["vectors"]))

    def embed(texts):
        todo = sorted({t for t in texts if t not in cache})
        if todo:
            vectors = np.asarray(backend.embed(todo), dtype=np.float32)
            cache.update(zip(todo, vectors))
            texts_all = list(cache)
            tmp = path.with_name(".suggest_embeddings.tmp.npz")
            np.savez(tmp, texts=np.array(texts_all), vectors=np.stack([cache[t] for t in texts_all]))
            tmp.replace(path)
        return np.stack([cache[t] for t in texts]) if texts else np.zeros((0, 1))
    return embed


def suggest(run_dir: str | Path, k: int, strategy: str = DEFAULT_STRATEGY, *, backend=None,
            data: str | Path | None = None, seed: int = 0) -> tuple[list[Candidate], str]:
    """The ranked suggestions and the run's id (the pre-annotations' model version)."""
    run_dir = Path(run_dir)
    items, config = candidates(run_dir, data)
    labeled = load_split(find_split(Path(data or config.data), "labeled"), split="labeled")
    embed = None
    if strategy == "combined":
        if backend is None:
            from .backends import registry

            backend = registry.entry(config.backend).load(workdir=run_dir / "backend")
        embed = embedder(run_dir, backend)
    run_id = RunDir(run_dir).run_id
    return rank(items, k, strategy, labeled=labeled, embed=embed, seed=seed), run_id
