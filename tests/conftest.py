"""Shared test set-up: the network is closed except loopback, ../shared is found beside the
repository, tiktoken reads its offline cache, and the real model loads once per session."""
from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

if (SHARED / "tiktoken").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and self.family in (socket.AF_INET, socket.AF_INET6):
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConnectionRefusedError(f"tests may only reach loopback, not {host}")
    return _connect(self, address)


socket.socket.connect = _loopback_only


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared beside the repository; tests that need it skip where it is absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not beside the repository")
    return SHARED


@pytest.fixture(scope="session")
def hf_backend(tmp_path_factory):
    """The hf backend on the embedded SmolLM2-135M, loaded once for the whole session."""
    from semievol.backends import load_backend

    return load_backend("hf", workdir=tmp_path_factory.mktemp("hf-work"), quiet=True)


@pytest.fixture(scope="session")
def hf_folder_bf16(tmp_path_factory) -> Path:
    """The embedded model as a plain Hugging Face folder in bfloat16: what a user of their
    own model (Llama-3.1-8B and the like) passes as ``--model``. Written once per session."""
    pytest.importorskip("transformers")
    from semievol.backends.hf import export_model

    return export_model("smollm2-135m", tmp_path_factory.mktemp("hf-folder") / "smollm2-bf16",
                        dtype="bfloat16")
