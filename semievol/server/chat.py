"""Shape backend results as OpenAI chat-completion choices and embedding rows.

Backend gaps and how they are filled (deviations from the real API):

- ``stop`` sequences are applied here, after generation: the text is cut before the first
  stop sequence, and so are tokens and logprobs (a token that starts before the cut is
  kept). The backend still generated up to ``max_tokens``.
- ``top_logprobs`` is always ``[]``: the Backend protocol returns only the chosen token's
  log-probability. ``bytes`` is the token's UTF-8 encoding.
- Log-probabilities are the model's raw ones (not temperature-scaled), as the protocol
  defines them; OpenAI's are the same quantity.
"""
from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np

from ..types import Generation


def cut_at_stop(gen: Generation, stops: Sequence[str]) -> Generation:
    """The generation up to (not including) the earliest stop sequence, if any occurs."""
    cut = min((i for i in (gen.text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut < 0:
        return gen
    keep, start = 0, 0
    joined = "".join(gen.tokens)
    token_cut = min((i for i in (joined.find(s) for s in stops if s) if i >= 0),
                    default=len(joined))
    for token in gen.tokens:
        if start >= token_cut:
            break
        start += len(token)
        keep += 1
    return Generation(text=gen.text[:cut], tokens=gen.tokens[:keep],
                      logprobs=gen.logprobs[:keep], finish_reason="stop")


def finish_reason(gen: Generation) -> str:
    """OpenAI's ``finish_reason`` of a generation: ``length`` or ``stop``."""
    return gen.finish_reason if gen.finish_reason in ("stop", "length") else "stop"


def choice(index: int, gen: Generation, *, logprobs: bool | int | None) -> dict:
    """One ``choices[i]`` entry of a chat completion; with ``logprobs`` the token logprobs
    are ``logprobs.content``."""
    content = None
    if logprobs:
        content = [{"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")),
                    "top_logprobs": []} for tok, lp in zip(gen.tokens, gen.logprobs)]
    return {"index": index, "finish_reason": finish_reason(gen),
            "message": {"role": "assistant", "content": gen.text, "refusal": None,
                        "annotations": []},
            "logprobs": {"content": content, "refusal": None} if logprobs else None}


def embedding_rows(vectors: np.ndarray, *, encoding_format: str,
                   dimensions: int | None) -> list[dict]:
    """``data`` of an embeddings response. ``dimensions`` keeps the first d components and
    normalises again (how OpenAI's text-embedding-3 models shorten). ``base64`` is the
    little-endian float32 bytes, which the openai SDK asks for by default."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1.0, norms)
    rows = []
    for i, row in enumerate(vectors):
        value = (base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                 if encoding_format == "base64" else row.tolist())
        rows.append({"object": "embedding", "index": i, "embedding": value})
    return rows
