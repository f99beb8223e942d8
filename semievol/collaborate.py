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

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from . import answers, prompts
from .backends import Backend
from .types import Example, Generation, Usage


@dataclass(frozen=True)
class View:
    shots: bool
    """Whether the prompt carries the retrieved solved examples."""
    temperature: float
    samples: int
    seed_offset: int = 0


@dataclass(frozen=True)
class Mined:
    """One unlabeled question mined: its inferences, and the pseudo-label they settle on.
    A line of ``collaborate_r<round>.jsonl`` (:meth:`to_json`)."""

    id: str
    responses: tuple[str, ...]
    answers: tuple[str | None, ...]
    """The answer extracted from each response (None: none found)."""
    entropies: tuple[float | None, ...]
    """Each response's entropy (None for an empty one)."""
    consistent: bool = False
    """Every inference gave the same answer."""
    justified: bool = False
    """The inferences disagreed and the disagreement was settled (by the model or a vote)."""
    pseudo_label: str | None = None
    entropy: float | None = None
    """The entropy of the responses (or of the verdict) that gave the pseudo-label."""
    justify_response: str | None = None
    """The model's verdict, where self-justify asked for one."""
    fallback: str | None = None
    """"vote" where the verdict named no answer and the majority decided."""

    @property
    def disagree(self) -> bool:
        """Several inferences that did not all give the same answer."""
        return not self.consistent and len(self.answers) > 1

    def labelled(self, label: str | None, **changes) -> "Mined":
        """This record with pseudo-label ``label``, its entropy the mean of the responses
        that gave it (unless ``changes`` give one)."""
        return dataclasses.replace(self, pseudo_label=label, **{
            "entropy": None if label is None else _entropy_of(self, label), **changes})

    def to_json(self) -> dict:
        row = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in row.items()
                if v is not None or k in ("pseudo_label", "entropy")}


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
         on_records: Callable[[list[Mined], Usage], None], quiet: bool = False) -> None:
    """Pseudo-label ``items`` with ``model``; hand each finished batch's records, and the
    tokens the batch used, to ``on_records`` (which persists them) before the next batch.

    ``justify`` settles disagreements: "model" asks the model (the paper's self-justify),
    "vote" takes the majority answer (ties: the lower mean entropy), None leaves them
    unlabeled. A model as small as 135M parameters answered "neutral" to 206 of 209 fpb
    self-justify prompts (43% right) where the vote was 63% right."""
    with tqdm(total=len(items), desc="collaborate", unit="q", disable=quiet) as bar:
        for batch in _batches(items, batch_size):
            samples, usage = infer(backend, model, batch, shots, views, style, max_tokens, seed)
            records = [_agree(ex, gens) for ex, gens in zip(batch, samples)]
            if justify == "model":
                records, used = _self_justify(backend, model, batch, records, style, max_tokens)
                usage += used
            elif justify == "vote":
                records = [_vote(r) if r.disagree else r for r in records]
            on_records(records, usage)
            bar.update(len(batch))


def infer(backend, model, batch, shots, views, style, max_tokens,
          seed) -> tuple[list[list[Generation]], Usage]:
    """All views' samples for each question of the batch, in view order, and the tokens
    they used."""
    per_item: list[list[Generation]] = [[] for _ in batch]
    usage = Usage()
    for view in views:
        messages = [prompts.question_prompt(ex, style, shots.get(ex.id, []) if view.shots else [])
                    for ex in batch]
        out = backend.generate_with_logprobs(model, messages, n=view.samples,
                                             temperature=view.temperature,
                                             max_tokens=max_tokens, seed=seed + view.seed_offset)
        usage += out.usage
        for gens, new in zip(per_item, out):
            gens.extend(new)
    return per_item, usage


def _agree(example: Example, gens: list[Generation]) -> Mined:
    labels = tuple(answers.extract(g.text, example) for g in gens)
    consistent = labels[0] is not None and all(l == labels[0] for l in labels)
    record = Mined(example.id, tuple(g.text for g in gens), labels,
                   tuple(_finite(g.entropy) for g in gens), consistent=consistent)
    return record.labelled(labels[0]) if consistent or len(gens) == 1 else record


def _entropy_of(record: Mined, label: str) -> float | None:
    values = [h for h, l in zip(record.entropies, record.answers) if l == label and h is not None]
    return sum(values) / len(values) if values else None


def _self_justify(backend, model, batch, records: list[Mined], style,
                  max_tokens) -> tuple[list[Mined], Usage]:
    """Ask the model to decide where the inferences disagree. Where its verdict names no
    answer, fall back to the majority of the candidates (marked ``fallback="vote"``)."""
    todo = [i for i, r in enumerate(records) if r.disagree]
    if not todo:
        return records, Usage()
    messages = [prompts.justify_prompt(batch[i], records[i].responses, style) for i in todo]
    verdicts = backend.generate_with_logprobs(model, messages, n=1, temperature=0.0,
                                              max_tokens=max_tokens)
    settled = list(records)
    for i, (verdict,) in zip(todo, verdicts):
        label = answers.extract(verdict.text, batch[i])
        if label is not None:
            settled[i] = records[i].labelled(label, justified=True, entropy=_finite(verdict.entropy),
                                             justify_response=verdict.text)
        else:
            settled[i] = dataclasses.replace(_vote(records[i]), justify_response=verdict.text,
                                             fallback="vote")
    return settled, verdicts.usage


def _vote(record: Mined) -> Mined:
    """The majority answer of the inferences (ties: the lower mean entropy)."""
    votes = Counter(l for l in record.answers if l is not None)
    if not votes:
        return dataclasses.replace(record, justified=True)
    top = max(votes.values())
    tied = [l for l, count in votes.items() if count == top]
    return record.labelled(min(tied, key=lambda l: _finite_or_inf(_entropy_of(record, l))),
                           justified=True)


def _finite_or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
