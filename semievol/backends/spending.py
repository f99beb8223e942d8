"""What a hosted backend's calls cost and may cost: the running total that feeds the budget
(:class:`Spending`), the refusal of a budget the price list cannot keep
(:func:`check_priced`), and embeddings sent in requests within a provider's limits, each
counted (:func:`embed_in_batches`).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from .. import cost
from ..errors import BackendError, ConfigError
from ..types import Embeddings, Usage


def check_priced(prices: dict[str, cost.Price], title: str, model: str,
                  embed_model: str) -> None:
    """A budget sees only priced steps (one without a price passes it): refuse a budget the
    run could not keep, rather than quietly not keep it."""
    missing = []
    price = cost.price_of(model, prices)
    if price is None or price.training is None:
        missing.append(f"{model}'s {'price' if price is None else 'training price'}")
    if embed_model != model and cost.price_of(embed_model, prices) is None:
        missing.append(f"{embed_model}'s price")
    if missing:
        raise ConfigError(f"--max-cost-usd cannot be kept: {title}'s price list lacks "
                          f"{' and '.join(missing)}. Give it in USD per 1M tokens with "
                          "--price MODEL=INPUT,OUTPUT,TRAINING (in Python: prices={MODEL: "
                          "{'input': ..., 'output': ..., 'training': ...}}), or drop "
                          "--max-cost-usd")


class Spending:
    """A hosted backend's running total of what its calls used, and the budget that reads
    it. Calls run in threads, hence the lock. Each call also hands its own usage back with
    its result; this total is only for the budget (and for people)."""

    def __init__(self, limit_usd: float | None, spent_usd: float = 0.0):
        self.total = Usage(cost_usd=spent_usd or None)
        """Starts at what a resumed run spent before (``spent_usd``), so the budget covers
        the whole run."""
        self.budget = cost.Budget(limit_usd, self.total)
        self._lock = threading.Lock()

    def add(self, usage: Usage) -> Usage:
        """Count ``usage`` in the total; return it."""
        with self._lock:
            self.total += usage
        return usage


def embed_in_batches(texts: Sequence[str], request: Callable, *, model: str, prices,
                     spending: Spending, max_inputs: int, max_tokens: int) -> Embeddings:
    """Embed ``texts`` with ``model`` in requests of at most ``max_inputs`` texts and
    ``max_tokens`` tokens (counted here), once the budget allows the whole call.
    ``request(texts)`` sends one request and returns the SDK's response; its
    ``usage.prompt_tokens`` counts where the API reports it, else the count made here."""
    counts = [cost.count_tokens(t, model) for t in texts]
    spending.budget.check(f"embedding {len(texts)} texts with {model}",
                          cost.embedding_cost(model, sum(counts), prices=prices))
    rows: list[list[float]] = []
    usage = Usage()
    for start, stop in request_batches(counts, max_inputs=max_inputs, max_tokens=max_tokens):
        response = request(list(texts[start:stop]))
        reported = getattr(response, "usage", None)  # an object, a dict (together) or None
        if isinstance(reported, dict):
            reported = reported.get("prompt_tokens")
        elif reported is not None:
            reported = reported.prompt_tokens
        tokens = reported or sum(counts[start:stop])
        usage.add(prompt=tokens, cost=cost.embedding_cost(model, tokens, prices=prices))
        if len(response.data) != stop - start:
            raise BackendError(f"sent {stop - start} texts to embed, {model} returned "
                               f"{len(response.data)} embeddings")
        rows.extend(d.embedding for d in sorted(response.data, key=lambda d: d.index))
    spending.add(usage)
    return Embeddings(normalised(rows) if rows else np.zeros((0, 0), dtype=np.float32), usage)


def request_batches(token_counts: Sequence[int], *, max_inputs: int, max_tokens: int):
    """(start, stop) ranges of at most ``max_inputs`` inputs and ``max_tokens`` tokens (an
    input over the token cap goes alone)."""
    start, tokens = 0, 0
    for i, count in enumerate(token_counts):
        if i > start and (i - start >= max_inputs or tokens + count > max_tokens):
            yield start, i
            start, tokens = i, 0
        tokens += count
    if start < len(token_counts):
        yield start, len(token_counts)


def normalised(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows as float32, each scaled to unit L2 norm (zero rows stay zero)."""
    vectors = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1.0, norms)).astype(np.float32)

