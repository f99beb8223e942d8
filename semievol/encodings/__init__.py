"""OpenAI's tokenizers, shipped: o200k_base (gpt-4o, gpt-4o-mini, gpt-4.1) and cl100k_base
(gpt-3.5-turbo, the text-embedding models), so token counts and cost estimates are exact
with no network and no ``TIKTOKEN_CACHE_DIR``.

tiktoken downloads each encoding's BPE ranks on first use. Here they are the same files
(xz-compressed; checked against the SHA-256 that tiktoken itself pins, so a damaged copy is
refused) built into tiktoken's own :class:`tiktoken.Encoding`. The files are OpenAI's, as
published for tiktoken (MIT licence); the patterns and special tokens below are
``tiktoken_ext/openai_public.py``'s.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import lzma
from importlib import resources

import tiktoken

__all__ = ["SHIPPED", "get_encoding", "encoding_for_model"]

_ENDOFTEXT, _ENDOFPROMPT = "<|endoftext|>", "<|endofprompt|>"

SHIPPED = {
    "o200k_base": {
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "pat_str": "|".join([
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]),
        "special_tokens": {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    },
    "cl100k_base": {
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        "special_tokens": {_ENDOFTEXT: 100257, "<|fim_prefix|>": 100258,
                           "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                           _ENDOFPROMPT: 100276},
    },
}
"""The encodings this package carries: name -> the hash of its BPE file, its split pattern
and its special tokens."""


@functools.lru_cache(maxsize=None)
def get_encoding(name: str) -> tiktoken.Encoding:
    """A shipped encoding when ``name`` is one, else tiktoken's own (which may download)."""
    spec = SHIPPED.get(name)
    if spec is None:
        return tiktoken.get_encoding(name)
    data = lzma.decompress(resources.files(__name__).joinpath(f"{name}.tiktoken.xz").read_bytes())
    if hashlib.sha256(data).hexdigest() != spec["sha256"]:
        raise ValueError(f"the shipped {name} BPE file is damaged (SHA-256 mismatch)")
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks,
                             special_tokens=spec["special_tokens"])


def encoding_for_model(model: str) -> tiktoken.Encoding:
    """tiktoken's encoding for a model name, from the shipped files where it is one of them.
    Raises KeyError for a model tiktoken does not know."""
    return get_encoding(tiktoken.encoding_name_for_model(model))
