"""What a run on a paid API costs: a price table, token counting and a budget guard.

Three uses, one set of numbers:

* **Before the run** (``semievol run --dry-run``): :mod:`semievol.estimate` counts the
  tokens the pipeline's own steps would send and prices them here.
* **During the run**: a hosted backend prices each step before it spends and asks a
  :class:`Budget` whether the step fits under ``--max-cost-usd``; it raises
  :class:`~semievol.errors.BudgetExceeded` before any money is spent on a step that would not.
* **After the run**: the backend prices what the API reported it used (response ``usage``
  fields, the job's ``trained_tokens``) with the same table, into ``results.json``.

Prices are USD per 1M tokens, as the provider publishes them: :data:`PRICES` for OpenAI
(standard, not priority, processing; the Batch API costs half) and :data:`TOGETHER_PRICES`
for Together. They change: pass overrides (``prices={"gpt-4o-mini": {...}}``) rather than
trusting these tables for billing. A model is priced by the longest table key it starts
with (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``); a fine-tuned model ``ft:BASE:org:...``
by the key ``ft:BASE``. Models not in the table (a local server's) have no price: their cost
is ``None``, never a guess.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import BudgetExceeded, ConfigError
from .types import Message, Usage

log = logging.getLogger(__name__)

__all__ = ["Price", "PRICES", "price_of", "count_tokens", "count_chat_tokens", "Budget",
           "chat_cost", "embedding_cost", "training_cost", "base_of", "match_model", "format_usd",
           "price_table", "exact_counts", "TOGETHER_PRICES", "PriceList", "OPENAI_PRICE_LIST",
           "TOGETHER_PRICE_LIST"]

PRICES_AS_OF = "2025-06"
"""When the table below was read from https://openai.com/api/pricing (standard tier)."""


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens for one model."""

    input: float
    output: float = 0.0
    cached_input: float | None = None
    """Prompt tokens served from the prompt cache; None means billed as ``input``."""
    training: float | None = None
    """Fine-tuning: per trained token (tokens in the training file x epochs)."""


PRICES: dict[str, Price] = {
    # chat models that can be fine-tuned: inference, and training per trained token
    "gpt-4o-mini": Price(input=0.15, cached_input=0.075, output=0.60, training=3.00),
    "gpt-4o": Price(input=2.50, cached_input=1.25, output=10.00, training=25.00),
    "gpt-4.1": Price(input=2.00, cached_input=0.50, output=8.00, training=25.00),
    "gpt-4.1-mini": Price(input=0.40, cached_input=0.10, output=1.60, training=5.00),
    "gpt-4.1-nano": Price(input=0.10, cached_input=0.025, output=0.40, training=1.50),
    "gpt-3.5-turbo": Price(input=0.50, output=1.50, training=8.00),
    # their fine-tuned models (ft:BASE:org:suffix:id) cost more to call
    "ft:gpt-4o-mini": Price(input=0.30, cached_input=0.15, output=1.20),
    "ft:gpt-4o": Price(input=3.75, cached_input=1.875, output=15.00),
    "ft:gpt-4.1": Price(input=3.00, cached_input=0.75, output=12.00),
    "ft:gpt-4.1-mini": Price(input=0.80, cached_input=0.20, output=3.20),
    "ft:gpt-4.1-nano": Price(input=0.20, cached_input=0.05, output=0.80),
    "ft:gpt-3.5-turbo": Price(input=3.00, output=6.00),
    # embeddings: input only
    "text-embedding-3-small": Price(input=0.02),
    "text-embedding-3-large": Price(input=0.13),
    "text-embedding-ada-002": Price(input=0.10),
}

TOGETHER_PRICES_AS_OF = "2026-11"
"""When the table below was read from Together's public pricing page,
https://www.together.ai/pricing (serverless inference, and supervised LoRA fine-tuning by
model size: up to 16B, 17-69B, 70-100B parameters). Override it (``prices=``) for billing."""

_TOGETHER_MODELS: dict[str, Price] = {
    # fine-tunable models: serverless inference (input = output), LoRA SFT per trained token
    "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference": Price(input=0.18, output=0.18,
                                                             training=0.48),
    "meta-llama/Meta-Llama-3.1-70B-Instruct-Reference": Price(input=0.88, output=0.88,
                                                              training=2.90),
    "meta-llama/Llama-3.2-3B-Instruct": Price(input=0.06, output=0.06, training=0.48),
    "Qwen/Qwen2.5-7B-Instruct": Price(input=0.30, output=0.30, training=0.48),
    "Qwen/Qwen2.5-14B-Instruct": Price(input=0.80, output=0.80, training=0.48),
    "mistralai/Mistral-7B-Instruct-v0.2": Price(input=0.20, output=0.20, training=0.48),
}
TOGETHER_PRICES: dict[str, Price] = {
    **_TOGETHER_MODELS,
    # a LoRA fine-tune is served at its base model's price (the key is ft:BASE, as for OpenAI)
    **{f"ft:{name}": Price(input=p.input, output=p.output)
       for name, p in _TOGETHER_MODELS.items()},
    # embeddings: input only
    "BAAI/bge-base-en-v1.5": Price(input=0.008),
    "BAAI/bge-large-en-v1.5": Price(input=0.016),
    "intfloat/multilingual-e5-large-instruct": Price(input=0.02),
}



@dataclass(frozen=True)
class PriceList:
    """A provider's prices as published on a date (a backend's, in
    :mod:`semievol.backends.registry`)."""

    seller: str
    """Whose prices ("OpenAI")."""
    as_of: str
    """When they were read."""
    table: Mapping[str, Price]


OPENAI_PRICE_LIST = PriceList("OpenAI", PRICES_AS_OF, PRICES)
TOGETHER_PRICE_LIST = PriceList("Together", TOGETHER_PRICES_AS_OF, TOGETHER_PRICES)

BATCH_DISCOUNT = 0.5
"""The Batch API bills input and output at half the standard price."""


def base_of(model: str) -> str:
    """The base model of a fine-tuned reference: ``ft:gpt-4o-mini-2024-07-18:org::id`` ->
    ``gpt-4o-mini-2024-07-18``; any other name is its own base."""
    if model.startswith("ft:"):
        return model.split(":")[1]
    return model


def price_table(overrides: Mapping[str, Price | Mapping] | None = None,
                prices: Mapping[str, Price] = PRICES) -> dict[str, Price]:
    """A provider's table (``prices``: OpenAI's by default) with ``overrides`` laid over it;
    an override is a :class:`Price` or a dict of its fields (``{"input": 0.15, "output": 0.6}``)."""
    table = dict(prices)
    for name, value in (overrides or {}).items():
        if isinstance(value, Mapping):
            try:
                value = Price(**value)
            except TypeError as e:
                raise ConfigError(f"price of {name!r}: {e}") from None
        if not isinstance(value, Price):
            raise ConfigError(f"price of {name!r} must be a Price or a dict, not {value!r}")
        table[name] = value
    return table


def price_of(model: str, prices: Mapping[str, Price] | None = None) -> Price | None:
    """The price of ``model``: the longest key it starts with (``ft:BASE`` for a fine-tuned
    model), or None when the table does not know it."""
    table = PRICES if prices is None else prices
    return match_model(table, f"ft:{base_of(model)}" if model.startswith("ft:") else model)


def match_model(table: Mapping[str, object], model: str):
    """The entry of the longest key that ``model`` is, or starts with followed by ``-``
    (``gpt-4o-mini-2024-07-18`` matches ``gpt-4o-mini``, not ``gpt-4o``); None if none."""
    keys = [k for k in table if model == k or model.startswith(k + "-")]
    return table[max(keys, key=len)] if keys else None


# -- what a call costs ------------------------------------------------------------------

def chat_cost(model: str, prompt_tokens: int, completion_tokens: int, *, cached_tokens: int = 0,
              batch: bool = False, prices: Mapping[str, Price] | None = None) -> float | None:
    """USD for one chat completion as its ``usage`` reports it (``prompt_tokens`` includes
    ``cached_tokens``)."""
    p = price_of(model, prices)
    if p is None:
        return None
    cached_rate = p.input if p.cached_input is None else p.cached_input
    usd = ((prompt_tokens - cached_tokens) * p.input + cached_tokens * cached_rate
           + completion_tokens * p.output) / 1e6
    return usd * (BATCH_DISCOUNT if batch else 1.0)


def embedding_cost(model: str, tokens: int, *,
                   prices: Mapping[str, Price] | None = None) -> float | None:
    p = price_of(model, prices)
    return None if p is None else tokens * p.input / 1e6


def training_cost(base: str, trained_tokens: int, *,
                  prices: Mapping[str, Price] | None = None) -> float | None:
    """USD for fine-tuning ``base`` (a base model or an ``ft:`` model, which trains at its
    base's rate) on ``trained_tokens`` = tokens in the training file x epochs."""
    p = price_of(base_of(base), prices)
    return None if p is None or p.training is None else trained_tokens * p.training / 1e6


# -- counting tokens --------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _encoding(model: str):
    """The tiktoken encoding of a model, from the encodings this package ships
    (:mod:`semievol.encodings`: exact, offline). Unknown models (a local server's) are
    counted with o200k_base, gpt-4o's. Only where no encoding can be had at all does the
    count fall back to bytes/4: it says so once, and estimates say they are approximate."""
    from .encodings import encoding_for_model, get_encoding

    try:
        return encoding_for_model(base_of(model))
    except KeyError:
        pass
    except Exception as e:  # an encoding tiktoken would have to download
        log.debug("no encoding for %s here (%s); counting with o200k_base", model, e)
    try:
        return get_encoding("o200k_base")
    except Exception as e:
        log.warning("no tokenizer could be loaded (%s): token counts and cost estimates are "
                    "approximate (bytes/4)", e)
        return None


def exact_counts(model: str) -> bool:
    """Whether token counts for ``model`` come from a real tokenizer (not bytes/4)."""
    return _encoding(model) is not None


def count_tokens(text: str, model: str = "gpt-4o-mini") -> int:
    """Tokens of ``text`` under ``model``'s tokenizer."""
    enc = _encoding(model)
    if enc is None:
        return math.ceil(len(text.encode()) / 4)
    return len(enc.encode(text, disallowed_special=()))


def count_chat_tokens(messages: Sequence[Message], model: str = "gpt-4o-mini") -> int:
    """Tokens a chat prompt (or training example) costs, as the OpenAI cookbook counts them:
    3 per message for the framing, 1 more per ``name``, every value's tokens, and 3 for the
    start of the reply."""
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            if isinstance(value, str):
                total += count_tokens(value, model)
            if key == "name":
                total += 1
    return total


# -- the guard --------------------------------------------------------------------------

class Budget:
    """Stops a run before a step that would take spending past ``limit_usd``.

    It reads what has been spent from ``usage.cost_usd`` (the backend's running total), so
    seeding that total from an earlier, resumed part of the run counts it too."""

    def __init__(self, limit_usd: float | None, usage: Usage):
        self.limit_usd = limit_usd
        self.usage = usage

    def check(self, step: str, estimate_usd: float | None) -> None:
        """Raise :class:`BudgetExceeded` if ``step``, costing about ``estimate_usd``, would
        pass the limit. A step with no price (a local server) always passes."""
        if self.limit_usd is None or estimate_usd is None:
            return
        spent = self.usage.cost_usd or 0.0
        if spent + estimate_usd > self.limit_usd:
            raise BudgetExceeded(
                f"{step} would cost about {format_usd(estimate_usd)}; with "
                f"{format_usd(spent)} already spent that passes the limit of "
                f"{format_usd(self.limit_usd)} (--max-cost-usd). "
                "Nothing was spent on it; raise the limit and rerun to resume.")


def format_usd(value: float | None) -> str:
    return "n/a" if value is None else f"${value:,.4f}"
