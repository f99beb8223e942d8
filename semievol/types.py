"""The plain data the stages pass around."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Message = dict[str, str]
"""A chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""

ChatExample = list[Message]
"""A training example: chat messages ending with the assistant's answer."""

AnswerKind = Literal["choice", "numeric", "text"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Example:
    """One question of a task split."""

    id: str
    question: str
    options: tuple[str, ...] | None = None
    """The answer options, or None for a free answer (numeric or short text)."""
    answer: str | None = None
    """The gold answer: an option letter ("A", "B", ...) for multi-choice, else the free
    answer text. None on the unlabeled split (its answers are hidden at load time)."""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    """Extra columns of the source row, kept as they were."""

    @property
    def kind(self) -> AnswerKind:
        if self.options is not None:
            return "choice"
        return "numeric" if _is_number(self.answer) else "text"

    def option_of(self, letter: str) -> str:
        """The text of the option with this letter."""
        return self.options[LETTERS.index(letter)]


@dataclass(frozen=True)
class Generation:
    """One sampled response with the log-probability of each of its tokens.

    ``logprobs[i]`` is log P(tokens[i] | prompt, tokens[:i]) under the model's raw
    distribution (not temperature-scaled), so entropies compare across backends."""

    text: str
    tokens: tuple[str, ...] = ()
    logprobs: tuple[float, ...] = ()
    finish_reason: str = "stop"

    def __post_init__(self):
        if len(self.tokens) != len(self.logprobs):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.logprobs)} logprobs")

    @property
    def entropy(self) -> float:
        """Mean negative token log-probability (paper eq. 6); inf for an empty response."""
        if not self.logprobs:
            return math.inf
        return -sum(self.logprobs) / len(self.logprobs)


@dataclass(frozen=True, slots=True)
class PseudoLabel:
    """What selection, evolution and the results need of one mined item: its pseudo-label
    and entropy, without the response texts (which stay in the stage's JSONL file), so a
    million of them fit in memory."""

    id: str
    pseudo_label: str | None
    entropy: float | None
    consistent: bool = False
    justified: bool = False

    @classmethod
    def of(cls, record: dict) -> "PseudoLabel":
        """From a collaborate record (as written to ``collaborate_r<round>.jsonl``)."""
        return cls(record["id"], record["pseudo_label"], record["entropy"],
                   record["consistent"], record["justified"])


@dataclass
class Usage:
    """Tokens used (and dollars paid, where it costs money): by one backend call, or summed
    over many. Every backend call's result carries its own (``.usage``), so whoever makes the
    call counts it; nothing diffs a running counter."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    trained_tokens: int = 0
    cost_usd: float | None = None
    """None while nothing priced has been spent (a local model costs nothing)."""

    def add(self, prompt: int = 0, completion: int = 0, trained: int = 0,
            cost: float | None = None) -> None:
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.trained_tokens += trained
        if cost is not None:
            self.cost_usd = (self.cost_usd or 0.0) + cost

    def __iadd__(self, other: "Usage") -> "Usage":
        self.add(other.prompt_tokens, other.completion_tokens, other.trained_tokens,
                 other.cost_usd)
        return self

    def __add__(self, other: "Usage") -> "Usage":
        total = Usage(**self.to_dict())
        total += other
        return total

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "trained_tokens": self.trained_tokens, "cost_usd": self.cost_usd}


class Generations(list):
    """What ``generate_with_logprobs`` returns: one list of n :class:`Generation` per prompt
    (a plain list in every other respect), and ``usage``, what the call used."""

    def __init__(self, outputs=(), usage: Usage | None = None):
        super().__init__(outputs)
        self.usage = usage or Usage()

    @classmethod
    def of(cls, answers) -> "Generations":
        """One call's result from its requests' ``(generations, usage)`` pairs, in order."""
        out = cls()
        for generations, usage in answers:
            out.append(generations)
            out.usage += usage
        return out


class Embeddings(np.ndarray):
    """What ``embed`` returns: one L2-normalised row per text (an ndarray in every other
    respect), and ``usage``, what the call used. Arrays derived from it carry no usage."""

    usage: Usage

    def __new__(cls, vectors, usage: Usage | None = None) -> "Embeddings":
        out = np.asarray(vectors).view(cls)
        out.usage = usage or Usage()
        return out

    def __array_finalize__(self, obj) -> None:
        self.usage = Usage()


class ModelRef(str):
    """What ``finetune`` returns: the new model's reference (a plain string in every other
    respect), and ``usage``, what training it took. That is reported again when an earlier
    call with the same key did the training (which is not repeated or paid for twice), so a
    run resumed after a crash still counts a fine-tune whose count the crash lost; whoever
    calls counts one fine-tune step once. ``losses``: the training loss curve as
    ``[step, loss]`` pairs, where the backend knows it (for ``--report-to``)."""

    usage: Usage
    losses: list

    def __new__(cls, ref: str, usage: Usage | None = None,
                losses: list | None = None) -> "ModelRef":
        out = super().__new__(cls, ref)
        out.usage = usage or Usage()
        out.losses = list(losses or [])
        return out


@dataclass
class Task:
    """A task directory loaded: three splits, and the unlabeled answers kept apart.

    ``hidden`` maps unlabeled ids to their answers when the file had them. Only reporting
    (pseudo-label accuracy) may read it; the algorithm never does."""

    name: str
    labeled: list[Example]
    unlabeled: list[Example]
    test: list[Example]
    hidden: dict[str, str] = field(default_factory=dict, repr=False)


def _is_number(text: str | None) -> bool:
    if text is None:
        return False
    try:
        return math.isfinite(float(text.replace(",", "").strip()))
    except ValueError:
        return False


# --- the labels of what a run makes: its models and stages ------------------------------

Baseline = Literal["vanilla", "sft"]
"""The models a run scores before evolving: the base model, and the warm-up (SFT)."""


def _stage(kind: str) -> property:
    """The name of a label's stage of this kind: ``evolve_r1``, ``collaborate_r2``."""
    return property(lambda label: f"{kind}_{label}")


@dataclass(frozen=True)
class Round:
    """A round of mining the unlabeled questions, and the model it evolves: ``r1``, ``r2``,
    ... (results.json's ``validation`` keys). Recipe 'auto' evolves its first round twice,
    with the labeled examples replayed and without (``variant``: ``r1_replay``,
    ``r1_alone``). Every stage the round makes is named from it."""

    number: int
    variant: Literal["replay", "alone"] | None = None

    def __str__(self) -> str:
        return f"r{self.number}" + (f"_{self.variant}" if self.variant else "")

    @classmethod
    def parse(cls, label: str) -> "Round | None":
        """The round a label names ("r2" -> Round(2)); None for another model's ("sft")."""
        number, _, variant = label.removeprefix("r").partition("_")
        if not label.startswith("r") or not number.isdigit():
            return None
        return cls(int(number), variant or None)  # type: ignore[arg-type]

    def of(self, variant: Literal["replay", "alone"] | None) -> "Round":
        return Round(self.number, variant)

    retrieve = _stage("retrieve")
    collaborate = _stage("collaborate")
    selection = _stage("selection")
    evolve = _stage("evolve")

    @property
    def seed_offset(self) -> int:
        """Mining's seed is the run's plus this: each round samples afresh."""
        return 1000 * self.number


@dataclass(frozen=True)
class Trial:
    """Recipe 'auto' mining the validation questions (answers hidden) under one of
    guard.MINING's settings, with the ordinary stages under these names."""

    settings: tuple[tuple[str, object], ...]
    """The RunConfig fields the trial sets, in guard.MINING's order."""

    def __str__(self) -> str:
        return "_".join(f"{k}-{v}" for k, v in self.settings)

    retrieve = "retrieve_choose"
    """The retrieved examples of the validation questions (the same for every trial)."""

    @property
    def collaborate(self) -> str:
        return f"choose_{self}"

    seed_offset = 999


def validation_stage(label: Baseline | Round) -> str:
    """The stage that scores a model on the validation slice (``eval_validation_sft``)."""
    return f"eval_validation_{label}"
