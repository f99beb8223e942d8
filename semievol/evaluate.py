"""Evaluate a model on a split with one prompt and one answer checker for every model:
accuracy, macro-F1 over the gold classes (multi-choice tasks), and error reduction."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from . import answers, prompts
from .backends import Backend
from .types import Example, Usage


@dataclass(frozen=True)
class Prediction:
    """A model's answer to one question: a line of ``eval_<model>.jsonl``."""

    id: str
    response: str
    prediction: str | None
    """The answer extracted from the response (None: none found)."""
    correct: bool
    entropy: float | None = None
    """The response's mean negative token log-probability (None: an empty response, or a
    file written before it was recorded): how sure the model was of this answer."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def predict(backend: Backend, model: str, items: Sequence[Example], *, style: str,
            max_tokens: int, batch_size: int,
            on_records: Callable[[list[Prediction], Usage], None], desc: str = "evaluate",
            quiet: bool = False) -> None:
    """Greedy answers of ``model`` to ``items``; each finished batch's predictions, and the
    tokens the batch used, go to ``on_records`` before the next batch starts."""
    with tqdm(total=len(items), desc=desc, unit="q", disable=quiet) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            out = backend.generate_with_logprobs(
                model, [prompts.question_prompt(ex, style) for ex in batch], n=1,
                temperature=0.0, max_tokens=max_tokens)
            records = []
            for ex, (gen,) in zip(batch, out):
                pred = answers.extract(gen.text, ex)
                records.append(Prediction(ex.id, gen.text, pred, answers.is_correct(pred, ex),
                                          gen.entropy if gen.logprobs else None))
            on_records(records, out.usage)
            bar.update(len(batch))


def metrics(records: Sequence[Prediction], items: Sequence[Example]) -> dict:
    """Accuracy (unanswered counts as wrong), macro-F1 for multi-choice items (None for
    free answers), and the number of items scored."""
    by_id = {ex.id: ex for ex in items}
    scored = [r for r in records if r.id in by_id]
    n = len(scored)
    accuracy = sum(r.correct for r in scored) / n if n else 0.0
    choice = all(by_id[r.id].options is not None for r in scored)
    f1 = macro_f1([by_id[r.id].answer for r in scored],
                  [r.prediction for r in scored]) if choice and n else None
    answered = sum(r.prediction is not None for r in scored)
    return {"accuracy": accuracy, "macro_f1": f1, "n": n, "answered": answered}


def macro_f1(gold: Sequence[str], predicted: Sequence[str | None]) -> float:
    """Mean F1 over the classes that occur in the gold labels (a missing or off-class
    prediction is a miss for its gold class)."""
    scores = []
    for c in sorted(set(gold)):
        tp = sum(g == c and p == c for g, p in zip(gold, predicted))
        fp = sum(g != c and p == c for g, p in zip(gold, predicted))
        fn = sum(g == c and p != c for g, p in zip(gold, predicted))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def error_reduction(accuracy: float, baseline: float) -> float | None:
    """Share of the baseline's errors removed: (acc - acc_base) / (1 - acc_base)."""
    return None if baseline >= 1 else (accuracy - baseline) / (1 - baseline)
