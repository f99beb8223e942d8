"""Collaborative learning (paper section 3.3): several differently configured inferences
of M_warm on each unlabeled question; agreeing answers become the pseudo-label, and
disagreements go to self-justify, where M_warm reads the candidates and decides.

A *view* is one inference configuration: with or without the retrieved solved examples,
a temperature, a seed, and how many samples it draws. The default is one view drawing n
samples from the same prompt at temperature 1 with their own random streams (as the
authors' code: temperature 1.0, different seeds); the prompt is then read once and shared
by the n samples (one KV cache locally, one request and one prompt bill on OpenAI).
``mixed`` views read two prompts per question, one with the retrieved examples and one
without, each drawing half of the samples; ``diverse`` views give each inference its own
seed, temperature and context.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from . import answers, prompts
from .backends import Backend
from .types import Example, Generation


@dataclass(frozen=True)
class View:
    shots: bool
    """Whether the prompt carries the retrieved solved examples."""
    temperature: float
    samples: int
    seed_offset: int = 0


def make_views(n: int, temperature: float, *, icp: bool, kind: str = "shared") -> list[View]:
    """The inference configurations of the n collaborating inferences (see RunConfig.views)."""
    if n == 1:
        return [View(shots=icp, temperature=0.0, samples=1)]
    if kind == "mixed" and icp:
        return [View(shots=True, temperature=temperature, samples=n - n // 2),
                View(shots=False, temperature=temperature, samples=n // 2, seed_offset=1)]
    if kind == "diverse":
        # Spread temperatures over [T/2, T]; with retrieval, alternate with and without it.
        return [View(shots=icp and i % 2 == 0,
                     temperature=temperature * (0.5 + 0.5 * i / (n - 1)), samples=1,
                     seed_offset=i)
                for i in range(n)]
    return [View(shots=icp, temperature=temperature, samples=n)]


def mine(backend: Backend, model: str, items: Sequence[Example],
         shots: dict[str, list[Example]], views: Sequence[View], *, style: str,
         max_tokens: int, seed: int, batch_size: int, justify: str | None = "model",
         on_records: Callable[[list[dict]], None], quiet: bool = False) -> None:
    """Pseudo-label ``items`` with ``model``; hand each finished batch's records to
    ``on_records`` (which persists them) before starting the next batch.

    ``justify`` settles disagreements: "model" asks the model (the paper's self-justify),
    "vote" takes the majority answer (ties: the lower mean entropy), None leaves them
    unlabeled. A model as small as 135M parameters answered "neutral" to 206 of 209 fpb
    self-justify prompts (43% right) where the vote was 63% right."""
    with tqdm(total=len(items), desc="collaborate", unit="q", disable=quiet) as bar:
        for batch in _batches(items, batch_size):
            samples = infer(backend, model, batch, shots, views, style, max_tokens, seed)
            records = [_agree(ex, gens) for ex, gens in zip(batch, samples)]
            if justify == "model":
                _self_justify(backend, model, batch, records, style, max_tokens)
            elif justify == "vote":
                for record in filter(_disagree, records):
                    _vote(record)
            on_records(records)
            bar.update(len(batch))


def infer(backend, model, batch, shots, views, style, max_tokens, seed) -> list[list[Generation]]:
    """All views' samples for each question of the batch, in view order."""
    per_item: list[list[Generation]] = [[] for _ in batch]
    for view in views:
        messages = [prompts.question_prompt(ex, style, shots.get(ex.id, []) if view.shots else [])
                    for ex in batch]
        out = backend.generate_with_logprobs(model, messages, n=view.samples,
                                             temperature=view.temperature,
                                             max_tokens=max_tokens, seed=seed + view.seed_offset)
        for gens, new in zip(per_item, out):
            gens.extend(new)
    return per_item


def _agree(example: Example, gens: list[Generation]) -> dict:
    labels = [answers.extract(g.text, example) for g in gens]
    consistent = labels[0] is not None and all(l == labels[0] for l in labels)
    record = {"id": example.id, "responses": [g.text for g in gens], "answers": labels,
              "entropies": [_finite(g.entropy) for g in gens], "consistent": consistent,
              "justified": False, "pseudo_label": None, "entropy": None}
    if consistent or len(gens) == 1:
        _label(record, labels[0])
    return record


def _label(record: dict, label: str | None) -> None:
    """Set the pseudo-label, with the mean entropy of the responses that gave it."""
    record["pseudo_label"] = label
    record["entropy"] = None if label is None else _entropy_of(record, label)


def _entropy_of(record: dict, label: str) -> float | None:
    values = [h for h, l in zip(record["entropies"], record["answers"])
              if l == label and h is not None]
    return sum(values) / len(values) if values else None


def _self_justify(backend, model, batch, records, style, max_tokens) -> None:
    """Ask the model to decide where the inferences disagree. Where its verdict names no
    answer, fall back to the majority of the candidates (marked ``"fallback": "vote"``)."""
    todo = [(ex, r) for ex, r in zip(batch, records) if _disagree(r)]
    if not todo:
        return
    messages = [prompts.justify_prompt(ex, r["responses"], style) for ex, r in todo]
    verdicts = backend.generate_with_logprobs(model, messages, n=1, temperature=0.0,
                                              max_tokens=max_tokens)
    for (ex, record), (verdict,) in zip(todo, verdicts):
        record["justified"] = True
        record["justify_response"] = verdict.text
        label = answers.extract(verdict.text, ex)
        if label is not None:
            record["pseudo_label"], record["entropy"] = label, _finite(verdict.entropy)
            continue
        _vote(record)
        record["fallback"] = "vote"


def _vote(record: dict) -> None:
    """The majority answer of the inferences (ties: the lower mean entropy)."""
    record["justified"] = True
    votes = Counter(l for l in record["answers"] if l is not None)
    if votes:
        top = max(votes.values())
        tied = [l for l, count in votes.items() if count == top]
        _label(record, min(tied, key=lambda l: _finite_or_inf(_entropy_of(record, l))))


def _disagree(record: dict) -> bool:
    """Several inferences that did not all give the same answer."""
    return not record["consistent"] and len(record["answers"]) > 1


def _finite_or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
