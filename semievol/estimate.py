"""What a run will spend, before it runs (``semievol run --dry-run``).

The estimate is the real pipeline (:func:`semievol.pipeline.run`, in a scratch directory)
run on :class:`CountingBackend`, which calls no model: it counts the tokens of every prompt,
training file and embedding input the run would send, with the provider's tokenizer, and
answers as the estimate assumes. So the estimate takes every step the pipeline takes, for
every recipe, view, ablation and number of rounds, by construction; each stage's tokens are
then priced from the price table (:mod:`semievol.cost`).

Where the run decides as it goes, the estimate assumes:

* the collaborating inferences of every question disagree, so with ``--justify model``
  every question also goes to self-justify (the dearer side);
* every response is the answer as the prompt style writes it (what a model fine-tuned on
  those answers says): a model that talks more spends more output tokens;
* entropies are spread evenly, so a round selects about theta of what it mines.
"""
from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import cost, pipeline, prompts
from .backends import registry
from .cost import Price
from .results import Results
from .rundir import slug
from .types import (LETTERS, ChatExample, Embeddings, Example, Generation, Generations, Message,
                    ModelRef, Round, Task, Usage)

__all__ = ["Step", "Estimate", "CountingBackend", "estimate_task", "estimate_run",
           "print_estimate", "step_cost"]


@dataclass(frozen=True)
class Step:
    """One spending step of a run (a pipeline stage), as token counts."""

    name: str
    """What the step is, as the table shows it ("warm-up fine-tune", "r1 collaborate", ...)."""
    model: str
    """The model billed: the base for fine-tuning, the (``ft:``) model for generation, the
    embedding model for retrieval."""
    input_tokens: int = 0
    """Prompt tokens (each prompt counted once, however many samples it asks for) or
    embedding input tokens."""
    output_tokens: int = 0
    """Completion tokens."""
    trained_tokens: int = 0
    """Fine-tuning: tokens in the training file x epochs."""
    batch: bool = False
    """Sent through the Batch API (half price)."""


def step_cost(step: Step, prices: Mapping[str, Price] | None = None) -> float | None:
    """USD for a step, or None when its model has no price."""
    if step.trained_tokens:
        return cost.training_cost(step.model, step.trained_tokens, prices=prices)
    return cost.chat_cost(step.model, step.input_tokens, step.output_tokens, batch=step.batch,
                          prices=prices)


@dataclass(frozen=True)
class Estimate:
    """The priced steps of a run and their total."""

    steps: tuple[tuple[Step, float | None], ...]
    total_usd: float | None = None
    """Sum of the step costs; None when any step has no price."""
    provider: str = "openai"
    """The backend whose price list (:mod:`semievol.backends.registry`) priced the steps."""
    approximate: bool = False
    """Token counts were guessed as bytes/4 (no tokenizer could be loaded)."""

    def format(self) -> str:
        """A plain table for the terminal."""
        rows = [("step", "model", "input tok", "output tok", "trained tok", "USD")]
        for step, usd in self.steps:
            rows.append((step.name + (" (batch)" if step.batch else ""), step.model,
                         f"{step.input_tokens:,}", f"{step.output_tokens:,}",
                         f"{step.trained_tokens:,}", cost.format_usd(usd)))
        rows.append(("total", "", "", "", "", cost.format_usd(self.total_usd)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        listed = registry.entry(self.provider).prices
        note = (f"Estimate at {listed.seller} list prices as of {listed.as_of}, from the "
                "pipeline's own steps; it assumes every question's inferences disagree and "
                "answers as long as the task's (semievol.estimate says why).")
        if self.approximate:
            note += " APPROXIMATE: no tokenizer could be loaded, tokens counted as bytes/4."
        return "\n".join(lines + [note])

    def to_dict(self) -> dict:
        return {"total_usd": self.total_usd, "approximate": self.approximate,
                "steps": [{"name": s.name, "model": s.model, "input_tokens": s.input_tokens,
                           "output_tokens": s.output_tokens, "trained_tokens": s.trained_tokens,
                           "batch": s.batch, "usd": usd}
                          for s, usd in self.steps]}


def estimate_run(steps: Sequence[Step], prices: Mapping[str, Price | Mapping] | None = None,
                 provider: str = "openai") -> Estimate:
    """Price each step (with ``prices`` laid over the price list of the backend
    ``provider``) and sum them."""
    table = cost.price_table(prices, registry.entry(provider).prices.table)
    priced = tuple((s, step_cost(s, table)) for s in steps)
    costs = [usd for _, usd in priced]
    total = None if any(c is None for c in costs) else sum(costs)
    return Estimate(priced, total, provider,
                    approximate=not all(cost.exact_counts(s.model) for s, _ in priced))


ChatCounter = Callable[[Sequence[Message], str], int]
TextCounter = Callable[[str, str], int]


class CountingBackend:
    """The Backend protocol, counting instead of computing (see the module docstring).

    ``task``: the task the run is on (to answer each prompt in its question's own words).
    ``count_chat(messages, model)`` and ``count_text(text, model)`` count tokens; by default
    tiktoken's, as OpenAI bills them. Fine-tuned references are ``ft:BASE:semievol::KEY``,
    so they are priced as fine-tuned ``BASE``."""

    name = "estimate"

    def __init__(self, task: Task, model: str, *, embed_model: str, style: str,
                 min_finetune_examples: int = 1,
                 count_chat: ChatCounter = cost.count_chat_tokens,
                 count_text: TextCounter = cost.count_tokens):
        self.default_model = model
        self.embed_model = embed_model
        self.min_finetune_examples = min_finetune_examples
        self.style = style
        self.count_chat, self.count_text = count_chat, count_text
        self._asks = {prompts.question_prompt(ex, style)[-1]["content"]: ex
                      for ex in (*task.labeled, *task.unlabeled, *task.test)}

    def finetune(self, base: str, examples: Sequence[ChatExample], config, *,
                 key: str) -> ModelRef:
        tokens = sum(self.count_chat(ex, base) for ex in examples) * round(config.epochs)
        return ModelRef(f"ft:{cost.base_of(base)}:semievol::{slug(key)}",
                        Usage(trained_tokens=tokens))

    def generate_with_logprobs(self, model: str, prompts: Sequence[list[Message]], *,
                               n: int = 1, temperature: float = 0.0, max_tokens: int = 64,
                               seed: int | None = None) -> Generations:
        out = Generations()
        for messages in prompts:
            example = self._asked(messages[-1]["content"])
            gens = [self._answer(example, None if temperature == 0 else (seed or 0) + i, i)
                    for i in range(n)]
            out.append(gens)
            out.usage.add(prompt=self.count_chat(messages, model),
                          completion=sum(self.count_text(g.text, model) for g in gens))
        return out

    def embed(self, texts: Sequence[str]) -> Embeddings:
        rows = np.stack([_unit(text) for text in texts]) if texts else np.zeros((0, 8))
        return Embeddings(rows.astype(np.float32),
                          Usage(prompt_tokens=sum(self.count_text(t, self.embed_model)
                                                  for t in texts)))

    def runtime(self) -> dict:
        return {"world_size": 1, "device": "none", "dtype": "none",
                "generation_engine": "estimate", "versions": {}}

    def _asked(self, content: str) -> Example | None:
        """The question a prompt asks (a self-justify prompt starts with it)."""
        return self._asks.get(content) or self._asks.get(
            content.split("\n\nCandidate answers from several attempts:")[0])

    def _answer(self, example: Example | None, sample: int | None, i: int) -> Generation:
        """A greedy answer (``sample`` None), or sample ``sample``: answers differ between
        samples, so inferences disagree. The entropy is spread evenly over questions."""
        h = _hash(example.id if example else "")
        pick = h if sample is None else h + sample
        if example is None or example.options is None:
            text = str(pick % 100)
        else:
            text = prompts.target(example, LETTERS[pick % len(example.options)], self.style)
        entropy = ((h + 7919 * i) % 1000 + 1) / 1000
        return Generation(text=text, tokens=(text,), logprobs=(-entropy,))


def estimate_task(task: Task, config, *, model: str, embed_model: str, batch: bool = False,
                  prices: Mapping[str, Price | Mapping] | None = None,
                  provider: str = "openai", min_finetune_examples: int = 1,
                  count_chat: ChatCounter | None = None,
                  count_text: TextCounter | None = None) -> Estimate:
    """What ``semievol run`` would spend on ``task`` (a loaded :class:`~semievol.types.Task`)
    with ``config`` (a :class:`~semievol.config.RunConfig`), stage by stage: the pipeline
    run on a :class:`CountingBackend` (``count_chat`` / ``count_text`` override its token
    counting). ``model``: the base model; ``embed_model``: the model retrieval embeds with;
    ``batch``: generation through the Batch API."""
    backend = CountingBackend(task, model, embed_model=embed_model, style=config.prompt_style,
                              min_finetune_examples=min_finetune_examples,
                              count_chat=count_chat or cost.count_chat_tokens,
                              count_text=count_text or cost.count_tokens)
    with tempfile.TemporaryDirectory(prefix="semievol-estimate-") as scratch:
        results = Results.of(pipeline.run(config, backend, scratch, task=task, quiet=True))
    steps = [_step(stage, usage, results, embed_model, batch)
             for stage, usage in results.usage_by_stage.items()]
    return estimate_run(steps, prices, provider)


def print_estimate(task: Task, config, **options) -> Estimate:
    """Print :func:`estimate_task`'s table (``semievol run --dry-run``) and return it."""
    estimate = estimate_task(task, config, **options)
    print(f"Estimated cost of this run ({task.name}: {len(task.labeled)} labeled, "
          f"{len(task.unlabeled)} unlabeled, {len(task.test)} test):\n")
    print(estimate.format())
    limit = config.max_cost_usd
    if limit is not None and estimate.total_usd is not None and estimate.total_usd > limit:
        print(f"\nThis is over --max-cost-usd {limit}: the run would stop before the step "
              "that passes it.")
    return estimate


def _step(stage: str, usage: dict, results: Results, embed_model: str, batch: bool) -> Step:
    """A pipeline stage's tokens as a Step, with the model it bills and a readable name.
    Stages are named ``<kind>_<what>``: ``warmup``, ``retrieve_r1``, ``collaborate_r1``,
    ``evolve_r1`` (``evolve_r1_replay``...), ``eval_sft``, ``eval_validation_r1``,
    ``evidence_r1``, ``retrieve_choose`` and ``choose_<settings>`` (recipe 'auto')."""
    models = results.models
    evolved = {row["round"]: row["model"] for row in results.rounds}
    kind, _, what = stage.partition("_")
    label = what.removeprefix("validation_")
    r = number.number if (number := Round.parse(label)) else None
    miner = (evolved.get(r - 1) if r else None) or models["warm"] or models["base"]
    if kind == "eval":
        named = {"vanilla": "base", "sft": "warm", "semievol": "evolved", "final": "final"}
        model = (models[named[label]] if label in named else None) or evolved.get(r) or miner
        name = f"eval {what.replace('_', ' ')}"
    else:
        model, name = {
            "warmup": (models["base"], "warm-up fine-tune"),
            "retrieve": (embed_model, f"{what} embed questions"),
            "collaborate": (miner, f"{what} collaborate"),
            "evolve": (miner, f"{what.replace('_', ' ')} evolve fine-tune"),
        }.get(kind, (models["warm"] or models["base"], stage.replace("_", " ")))
    if model.startswith("ft:"):  # the counting backend's references: priced as ft:BASE
        model = f"ft:{cost.base_of(model)}"
    return Step(name, model, input_tokens=usage["prompt_tokens"],
                output_tokens=usage["completion_tokens"], trained_tokens=usage["trained_tokens"],
                batch=batch and kind in ("collaborate", "eval", "choose"))


def _unit(text: str) -> np.ndarray:
    """A fixed unit vector per text (retrieval only needs some neighbours to count)."""
    seed = _hash(text)
    vector = np.random.default_rng(seed).standard_normal(8)
    return vector / np.linalg.norm(vector)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
