"""Evolve (paper eq. 9): M_evol = FT(M_warm, D_selected), continuing from the warm model."""
from __future__ import annotations

from collections.abc import Sequence

from . import prompts
from .backends import Backend
from .config import FinetuneConfig
from .types import Example, ModelRef


def evolve(backend: Backend, warm: str, selected: Sequence[tuple[Example, str]],
           config: FinetuneConfig, *, style: str, key: str) -> ModelRef:
    """Fine-tune ``warm`` further on (question, pseudo-label) pairs."""
    examples = [prompts.training_example(ex, label, style) for ex, label in selected]
    return backend.finetune(warm, examples, config, key=key)
