"""A deterministic in-process backend for fast tests of the algorithm.

No model and no network. Answers come from a ``rule`` you give it (scripted per prompt,
sample and model), or by default from what it was "trained" on: a fine-tuned reference
answers a training prompt with that example's answer, and anything else with the answer
it was trained on most often (the base model with ``default_answer``). Token logprobs are
derived from a hash of the text (or given by the rule), embeddings are hashed bags of
words, and every call is recorded in ``calls``.
With a ``workdir`` its fine-tunes are kept there (one JSON file each), so a run killed and
resumed through the command line answers as one that was never stopped.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..rundir import atomic_write_json, slug
from ..types import ChatExample, Embeddings, Generation, Generations, Message, ModelRef, Usage
from . import library_versions


@dataclass(frozen=True)
class FakeCall:
    """What a rule sees for one sample."""

    model: str
    messages: list[Message]
    sample: int
    temperature: float
    seed: int | None
    trained: tuple[ChatExample, ...]
    """Every example the model (and the models it continued) was fine-tuned on."""

    @property
    def user(self) -> str:
        return self.messages[-1]["content"]


Rule = Callable[[FakeCall], "str | Generation"]


class FakeBackend:
    name = "fake"
    default_model = "fake-base"
    min_finetune_examples = 1

    def __init__(self, rule: Rule | None = None, *, model: str | None = None,
                 default_answer: str = "I don't know", dim: int = 64,
                 workdir: str | Path | None = None):
        self.default_model = model or "fake-base"
        self.rule = rule
        self.default_answer = default_answer
        self.dim = dim
        self.workdir = workdir
        self.calls: list[tuple[str, dict]] = []
        self.trained: dict[str, tuple[str, tuple[ChatExample, ...]]] = {}
        """reference -> (its base, the examples it was fine-tuned on)."""
        self.saved = Path(workdir) / "finetunes" if workdir is not None else None
        for path in sorted(self.saved.glob("*.json")) if self.saved else []:
            record = json.loads(path.read_text())
            self.trained[record["ref"]] = (record["base"], _examples(record["examples"]))

    # -- Backend protocol ---------------------------------------------------------------
    def finetune(self, base, examples, config, *, key):
        ref = f"fake-ft:{key}"
        self.calls.append(("finetune", {"base": base, "n_examples": len(examples), "key": key}))
        if ref not in self.trained:
            self.trained[ref] = (base, _examples(examples))
            if self.saved is not None:
                atomic_write_json(self.saved / f"{slug(key)}.json",
                                  {"ref": ref, "base": base, "examples": self.trained[ref][1]})
        _, trained = self.trained[ref]
        words = sum(_count(m["content"]) for ex in trained for m in ex)
        steps = math.ceil(-(-len(trained) // config.batch_size) * config.epochs)
        curve = [[step, round(2.0 / step, 6)] for step in range(1, steps + 1)]  # scripted
        return ModelRef(ref, Usage(trained_tokens=round(words * config.epochs)), curve)

    def generate_with_logprobs(self, model, prompts, *, n=1, temperature=0.0, max_tokens=64,
                               seed=None):
        self.calls.append(("generate", {"model": model, "n_prompts": len(prompts), "n": n,
                                        "temperature": temperature, "seed": seed}))
        trained = self._lineage(model)
        out = Generations()
        for messages in prompts:
            out.usage.add(prompt=sum(_count(m["content"]) for m in messages))
            samples = []
            for i in range(n):
                call = FakeCall(model, list(messages), i, temperature, seed, trained)
                result = self.rule(call) if self.rule else self._remember(call)
                gen = result if isinstance(result, Generation) else _generation(result)
                out.usage.add(completion=len(gen.tokens))
                samples.append(gen)
            out.append(samples)
        return out

    def embed(self, texts: Sequence[str]) -> Embeddings:
        self.calls.append(("embed", {"n_texts": len(texts)}))
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _words(text):
                vectors[row, _hash(word) % self.dim] += 1.0
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return Embeddings(vectors / np.where(norms == 0, 1.0, norms),
                          Usage(prompt_tokens=sum(map(_count, texts))))

    def runtime(self) -> dict:
        return {"world_size": 1, "device": "none", "dtype": "none",
                "generation_engine": "fake", "versions": library_versions()}

    # -- helpers ------------------------------------------------------------------------
    def _lineage(self, model: str) -> tuple[ChatExample, ...]:
        examples: list[ChatExample] = []
        while model in self.trained:
            model, own = self.trained[model]
            examples.extend(own)
        return tuple(examples)

    def _remember(self, call: FakeCall) -> str:
        for example in reversed(call.trained):
            if example[-2]["content"] == call.user:
                return example[-1]["content"]
        answers = Counter(example[-1]["content"] for example in call.trained)
        return answers.most_common(1)[0][0] if answers else self.default_answer

    def calls_of(self, method: str) -> list[dict]:
        return [kwargs for name, kwargs in self.calls if name == method]


def _examples(examples) -> tuple[ChatExample, ...]:
    return tuple(tuple(dict(m) for m in ex) for ex in examples)


def _generation(text: str) -> Generation:
    tokens = tuple(re.findall(r"\S+|\s+", text)) or ()
    logprobs = tuple(-(_hash(tok) % 1000) / 1000.0 for tok in tokens)
    return Generation(text=text, tokens=tokens, logprobs=logprobs)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _count(text: str) -> int:
    return len(_words(text))


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
