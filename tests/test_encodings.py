"""The tokenizers ship with semievol: exact token counts with no network and no cache."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import SHARED, require


from semievol.encodings import SHIPPED, encoding_for_model, get_encoding

TEXT = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn, ça va? 日本語 🙂\n\n  x=1;"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_encodings_load_and_round_trip(name):
    enc = get_encoding(name)
    ids = enc.encode(TEXT)
    assert enc.decode(ids) == TEXT and len(ids) > 10
    assert enc.n_vocab > 100_000


def test_models_map_to_their_encodings():
    assert encoding_for_model("gpt-4o-mini").name == "o200k_base"
    assert encoding_for_model("text-embedding-3-small").name == "cl100k_base"
    with pytest.raises(KeyError):
        encoding_for_model("no-such-model")


def test_counts_match_tiktokens_own_files():
    """Where tiktoken's own o200k file is at hand (../shared/tiktoken, its download cache),
    the shipped encoding gives the very same ids."""
    require((SHARED / "tiktoken").is_dir(), "needs tiktoken's own o200k file in ../shared/tiktoken")
    code = ("import tiktoken; e = tiktoken.get_encoding('o200k_base'); "
            f"print(e.encode({TEXT!r}))")
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(SHARED / "tiktoken")}
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, check=True).stdout.strip()
    assert theirs == str(get_encoding("o200k_base").encode(TEXT))


def test_token_counts_are_exact_without_a_cache_or_network():
    """A fresh interpreter with no TIKTOKEN_CACHE_DIR and a proxy that goes nowhere: the
    counts are the pinned exact ones, not bytes/4 (which would give 9 for the chat)."""
    code = ("from semievol import cost; "
            "print(cost.count_chat_tokens([{'role': 'user', 'content': 'hello'}], 'gpt-4o-mini'), "
            "cost.count_tokens('hello world', 'text-embedding-3-small'), "
            "cost.exact_counts('gpt-4o-mini'))")
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env.update(HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["8", "2", "True"]
    assert "approximate" not in out.stderr


def test_an_estimate_without_a_tokenizer_says_it_is_approximate():
    from semievol.estimate import Estimate, Step, estimate_run

    step = Step("warm-up", "gpt-4o-mini", trained_tokens=1000)
    assert "APPROXIMATE" in Estimate(((step, 0.003),), 0.003, approximate=True).format()
    exact = estimate_run([step])
    assert not exact.approximate and "APPROXIMATE" not in exact.format()
