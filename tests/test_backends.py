"""Every backend implements the whole Backend protocol (a missing member would only show
deep inside a run)."""
from __future__ import annotations

import importlib

import pytest

from semievol.backends import Backend

MEMBERS = [name for name in dir(Backend) if not name.startswith("_")]


@pytest.mark.parametrize("module, name", [
    ("semievol.backends.fake", "FakeBackend"), ("semievol.backends.hosted", "HostedBackend"),
    # slow: importing it loads torch, transformers and peft (6 s)
    pytest.param("semievol.backends.hf", "HFBackend", marks=pytest.mark.slow)])
def test_every_backend_has_every_protocol_method(module, name):
    cls = getattr(importlib.import_module(module), name)
    methods = [m for m in MEMBERS if callable(getattr(Backend, m))]
    assert {"finetune", "generate_with_logprobs", "embed", "runtime"} <= set(methods)
    assert [m for m in methods if not callable(getattr(cls, m, None))] == []
