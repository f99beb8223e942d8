"""The hf backend generating on a real vLLM server (CPU, `make vllm`), against its own
decode loop on the same weights; and a whole `semievol run --vllm-url` on an fpb slice.

The server (the ``vllm_url`` session fixture) serves the float32 export of the embedded
model; the local side loads the GGUF alias in float32: the same weights in the same dtype.
Measured on this CPU: greedy texts identical, token log-probabilities within 2e-5 of the
local loop's (base model and through a LoRA adapter), so TOLERANCE below leaves a 5x
margin for other CPUs' kernels. The server runs with ``--dtype float32``: on its default
(``auto``, the folder's dtype) a bfloat16 export would run in bfloat16, which is not the
local loop's arithmetic and was not compared here."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from semievol.backends.vllm import VLLMServer, served_name
from semievol.errors import BackendError, ConfigError

from conftest import VLLM_MODEL, password
from test_pipeline_hf import TINY, check_schema

TOLERANCE = 1e-4
"""Largest difference allowed between vLLM's and the local loop's log-probability of a
token (nats); measured at most 2e-5."""

SYSTEM = {"role": "system", "content": "Answer in one word."}
PROMPTS = [[SYSTEM, {"role": "user", "content": q}] for q in [
    "What is 2 + 2?", "Name a colour.", "What is the capital of France?",
    "Which animal says moo?", "Name a large animal that lives in the ocean.",
    "What do bees make?"]] + [[{"role": "user", "content": "Tell me about the sea."}]]


@pytest.fixture(scope="module")
def on_vllm(hf_backend, vllm_url):
    """An hf backend generating on the server, sharing the local one's adapters."""
    from semievol.backends import load_backend

    return load_backend("hf", workdir=hf_backend.workdir, vllm_url=vllm_url, quiet=True)


@pytest.mark.slow  # the hf backend it builds imports transformers and peft (6 s)
def test_an_unreachable_server_is_a_backend_error(tmp_path):
    from semievol.backends import load_backend

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = load_backend("hf", workdir=tmp_path, vllm_url=f"http://127.0.0.1:{port}")
    assert backend.generation_engine == "vllm" and backend.vllm.url.endswith(f"{port}/v1")
    with pytest.raises(BackendError, match="vLLM server"):
        backend.generate_with_logprobs("smollm2-135m", PROMPTS[:1], max_tokens=4)
    assert load_backend("hf", workdir=tmp_path).generation_engine == "hf"


def test_vllm_url_is_for_the_hf_backend(tmp_path):
    from semievol.cli import _parser, make_backend
    from semievol.server import serve

    args = _parser().parse_args(["eval", "--data", "d", "--backend", "openai",
                                 "--vllm-url", "http://127.0.0.1:1"])
    with pytest.raises(ConfigError, match="--vllm-url"):
        make_backend(args, tmp_path)
    with pytest.raises(ConfigError, match="--vllm-url"):
        serve("fake", state_dir=tmp_path, vllm_url="http://127.0.0.1:1")


def test_served_names_follow_the_adapter_files(tmp_path):
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "adapter_model.safetensors").write_bytes(b"one")
    first = served_name(tmp_path / "warmup")
    assert first.startswith("warmup-") and served_name(tmp_path / "warmup") == first
    (tmp_path / "warmup" / "adapter_model.safetensors").write_bytes(b"two")
    assert served_name(tmp_path / "warmup") != first


@pytest.mark.slow
@pytest.mark.parametrize("through_adapter", [False, True], ids=["base", "adapter"])
def test_vllm_and_the_local_loop_agree_on_greedy_text_and_logprobs(
        hf_backend, on_vllm, taught, through_adapter):
    model = taught if through_adapter else "smollm2-135m"
    prompts = PROMPTS + [password("castle"), password("island")]
    local = hf_backend.generate_with_logprobs(model, prompts, n=2, max_tokens=16)
    served = on_vllm.generate_with_logprobs(model, prompts, n=2, max_tokens=16)
    assert [len(g) for g in served] == [2] * len(prompts)
    worst = 0.0
    for mine, theirs in zip(local, served):
        assert theirs[0] == theirs[1]
        assert theirs[0].text == mine[0].text
        assert theirs[0].tokens == mine[0].tokens  # the end-of-turn token is not among them
        assert theirs[0].finish_reason == mine[0].finish_reason
        worst = max(worst, *np.abs(np.subtract(theirs[0].logprobs, mine[0].logprobs)))
    print(f"largest logprob difference: {worst:.2e}")
    assert worst < TOLERANCE
    if through_adapter:
        assert all("Zorblax" in gens[0].text for gens in served[-2:])


@pytest.mark.slow
def test_sampled_logprobs_are_raw_not_temperature_scaled(hf_backend, on_vllm):
    """At temperature 0.7 each token's logprob is still the model's own (teacher-forced)
    one, so entropies mean what they mean locally."""
    out = on_vllm.generate_with_logprobs("smollm2-135m", PROMPTS[:4], n=4, temperature=0.7,
                                         max_tokens=12, seed=5)
    assert [len(g) for g in out] == [4] * 4
    assert any(len({g.text for g in gens}) > 1 for gens in out)  # n samples, not one
    flat = [(p, g) for p, gens in zip(PROMPTS, out) for g in gens
            if "\ufffd" not in "".join(g.tokens)]  # byte fragments do not re-tokenize
    assert len(flat) >= 14
    for _, g in flat:
        assert "".join(g.tokens) == g.text and len(g.tokens) == len(g.logprobs)
    scores = hf_backend.score("smollm2-135m", [p for p, _ in flat], [g.tokens for _, g in flat])
    for (_, g), teacher in zip(flat, scores):
        assert np.allclose(g.logprobs, teacher, atol=TOLERANCE)
    again = on_vllm.generate_with_logprobs("smollm2-135m", PROMPTS[:4], n=4, temperature=0.7,
                                           max_tokens=12, seed=5)
    assert [[g.text for g in gens] for gens in again] == [[g.text for g in gens] for gens in out]


@pytest.mark.slow
def test_an_adapter_is_loaded_once_and_found_again(on_vllm, taught, vllm_url):
    name = on_vllm.vllm.model_id(taught)
    listed = [m.id for m in on_vllm.vllm.models()]
    assert listed.count(name) == 1
    fresh = VLLMServer(vllm_url)  # e.g. a resumed run: no second load
    assert fresh.model_id(taught) == name
    assert [m.id for m in fresh.models()] == listed
    assert fresh.model_id() == str(VLLM_MODEL)


@pytest.mark.slow
def test_a_run_on_fpb_through_vllm(shared, vllm_url, tmp_path):
    """`semievol run --vllm-url` trains here, generates on the server, and leaves the run's
    adapters (warm-up and evolved) loaded there. The local side loads the folder the
    server serves. The smallest run with both fine-tunes (test_pipeline_hf's TINY): what
    vLLM's numbers are worth is the other tests' part, this one is the run's plumbing."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "semievol", "run", "--data", str(shared / "data" / "fpb"),
            "--backend", "hf", "--model", str(VLLM_MODEL), "--vllm-url", vllm_url,
            "--out", str(out), "--epochs", "1", "--quiet", *TINY]
    result = subprocess.run(args, capture_output=True, text=True, timeout=1200,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((out / "results.json").read_text())
    check_schema(results)
    assert results["eval"]["semievol"]["n"] == 8 and results["unlabeled"]["total"] == 8
    assert results["runtime"]["generation_engine"] == "vllm"
    assert results["usage"]["prompt_tokens"] > 0 and results["usage"]["completion_tokens"] > 0
    served = {m.id for m in VLLMServer(vllm_url).models()}
    for kind in ("warm", "evolved"):
        assert served_name(results["models"][kind]) in served


@pytest.mark.slow
def test_semievol_serve_generates_on_vllm(vllm_url, tmp_path):
    """`semievol serve --backend hf --vllm-url`: its chat completions come from vLLM (its
    request counter moves), with the local loop's greedy text."""
    import urllib.request

    from test_server import running_server

    def requests_done() -> float:
        with urllib.request.urlopen(f"{vllm_url}/metrics") as response:
            lines = response.read().decode().splitlines()
        return sum(float(line.split()[-1]) for line in lines
                   if line.startswith("vllm:request_success_total"))

    before = requests_done()
    with running_server("hf", tmp_path / "state", "--vllm-url", vllm_url) as server:
        reply = server.client().chat.completions.create(
            model="smollm2-135m", messages=PROMPTS[2], n=2, logprobs=True, max_tokens=8,
            temperature=1.0, seed=0)
    assert len(reply.choices) == 2 and all(c.logprobs.content for c in reply.choices)
    assert requests_done() > before
