"""Embeddings on the hf backend: mean-pooled last hidden states, L2-normalised, float32,
from the base model (adapters off) or from a separate embedding model."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from ...errors import BackendError
from .decode import input_device, last_hidden


def mean_pooled(model, tok, texts: Sequence[str], batch_size: int, *,
                causal: bool) -> tuple[np.ndarray, int]:
    """One unit row per text (the mean over its real tokens), and the tokens read."""
    rows: list[np.ndarray] = []
    tokens = 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tok(list(texts[start:start + batch_size]), padding=True,
                        padding_side="right", return_tensors="pt").to(input_device(model))
            hidden = last_hidden(model, batch, causal=causal)
            tokens += int(batch["attention_mask"].sum())
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            rows.append(torch.nn.functional.normalize(mean.float(), dim=-1).cpu().numpy())
    if not rows:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32), 0
    return np.concatenate(rows), tokens


def load_embedder(name: str, dtype, device) -> tuple[object, torch.nn.Module]:
    """(tokenizer, encoder) of an embedding model; BackendError when it cannot load."""
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModel.from_pretrained(name, dtype=dtype, device_map=device).eval()
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot load embedding model {name!r}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model
