"""The one seam between the algorithm and a model: the Backend protocol.

Five backends implement it and never inherit from each other:
``hf`` (transformers + peft LoRA, local), ``openai`` (the official SDK: fine-tuning jobs,
chat completions with logprobs, embeddings), ``together`` (the official together SDK: LoRA
jobs on hosted open models), ``tinker`` (the official tinker SDK: LoRA by primitives, no
embeddings) and ``fake`` (deterministic, in-process, for tests). The two job APIs are one
lifecycle (:mod:`.hosted`) with a small adapter each; tinker's loop (:mod:`.tinker`) uses
the same shared parts (key, records, spending, error translation). Pick one by name with
:func:`load_backend`; :mod:`.registry` lists them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..types import ChatExample, Embeddings, Generations, Message, ModelRef

if TYPE_CHECKING:
    from ..config import FinetuneConfig

__all__ = ["Backend", "load_backend", "library_versions"]

LIBRARIES = ("semievol", "torch", "transformers", "peft", "accelerate", "openai", "together",
             "tinker", "faiss-cpu", "numpy")
"""The distributions whose versions a run records (those installed)."""


@runtime_checkable
class Backend(Protocol):
    name: str
    """Its name in :mod:`.registry` ("hf", "openai", "together", "fake"...)."""
    default_model: str
    """The model reference used when none is named."""
    min_finetune_examples: int
    """The fewest examples ``finetune`` accepts (OpenAI's API refuses fewer than 10); the
    pipeline skips a fine-tune with fewer rather than fail."""

    def finetune(self, base: str, examples: Sequence[ChatExample], config: "FinetuneConfig",
                 *, key: str) -> ModelRef:
        """Fine-tune ``base`` (a base model or an earlier fine-tuned reference) on chat
        examples; return the new model's reference (a ``str``) with the tokens it trained
        (``.usage``). ``key`` is an idempotency key: a second call with the same key returns
        the same model without training or paying again."""
        ...

    def generate_with_logprobs(self, model: str, prompts: Sequence[list[Message]], *,
                               n: int = 1, temperature: float = 0.0, max_tokens: int = 64,
                               seed: int | None = None) -> Generations:
        """n generations per prompt, each with its tokens' raw log-probabilities: a
        ``list[list[Generation]]`` with the call's tokens in ``.usage`` (each prompt
        counted once, however large ``n`` is, where the backend shares it)."""
        ...

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """One L2-normalised row per text, shape (len(texts), d): an ndarray with the call's
        tokens in ``.usage``."""
        ...

    def runtime(self) -> dict:
        """Where and how the backend computes, recorded in ``results.json``: ``world_size``
        (data-parallel processes), ``device``, ``dtype``, ``generation_engine`` ("hf" for
        the local decode loop, "vllm" for a vLLM server, "api" for a hosted API) and
        ``versions`` (:func:`library_versions`)."""
        ...


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries in :data:`LIBRARIES`, by distribution name."""
    from importlib import metadata

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def load_backend(name: str, **options) -> Backend:
    """Build a backend by name (:mod:`.registry`). Options are the backend's own
    (``workdir`` for all: where it keeps adapters or job records; ``base_url`` /
    ``api_key`` for the hosted ones; ...)."""
    from .registry import entry

    return entry(name).load(**options)
