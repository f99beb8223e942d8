"""Contract tests: every request the OpenAI backend sends is one the official API accepts.

A Prism mock server of the official OpenAPI description (``../shared/openai-openapi``)
checks each request's shape against the spec and answers with schema-shaped example data.
We drive the backend's real methods against it, record every response's status with an
``httpx2`` event hook, and require 2xx for all of them; a deliberately malformed request in
the same suite must get 422, proving that validation is on. Prism answers static examples
(a job stays ``validating_files``, a batch ``validating``, one choice even when n=4), so
waits are bounded with ``max_wait`` and those outcomes are expected, not failures.

Prism comes from ``npm install --no-save --no-audit --no-fund @stoplight/prism-cli@5.14.2``
in the repository root. Without it these tests skip, or fail where ``CI`` is set.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2
import openai
import pytest

from semievol.backends.openai import OpenAIBackend
from semievol.config import FinetuneConfig
from semievol.errors import BackendError

REPO = Path(__file__).resolve().parents[1]
PRISM = REPO / "node_modules" / ".bin" / "prism"
SPEC = REPO.parent / "shared" / "openai-openapi" / "openapi.mock.json"
MODEL = "gpt-4o-mini-2024-07-18"

pytestmark = pytest.mark.slow


@contextmanager
def prism_mock(spec: Path, log_dir: Path):
    """A Prism mock of ``spec`` on a free port; yields its base URL (``.../v1``). Skips
    where Prism or the spec is missing, fails instead where ``CI`` is set."""
    if not (PRISM.exists() and spec.exists()):
        reason = (f"Prism or the spec is missing ({PRISM}, {spec}); run `npm install --no-save "
                  "--no-audit --no-fund @stoplight/prism-cli@5.14.2` in the repository root")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = log_dir / "prism.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(PRISM), "mock", str(spec), "-h", "127.0.0.1", "-p", str(port), "-v", "warn"],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"prism exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"prism did not answer on port {port} within 90 s")
                time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def prism(tmp_path_factory):
    """A Prism mock of the official OpenAI spec; yields its base URL."""
    with prism_mock(SPEC, tmp_path_factory.mktemp("prism")) as url:
        yield url


@pytest.fixture
def seen():
    """(method, path, status, body-if-error) of every response the backend received."""
    return []


@pytest.fixture
def backend(prism, seen, tmp_path):
    def record(response: httpx2.Response):
        response.read()
        error = response.text if response.status_code >= 400 else ""
        seen.append((response.request.method, response.request.url.path, response.status_code,
                     error))

    client = httpx2.Client(event_hooks={"response": [record]})
    yield OpenAIBackend(MODEL, base_url=prism, api_key="sk-contract", workdir=tmp_path,
                        max_retries=0, timeout=30, poll_interval=0.05, max_wait=0.3,
                        quiet=True, http_client=client)
    client.close()


def assert_all_accepted(seen, *expected):
    """Every response 2xx, and each expected (method, path prefix) among them."""
    rejected = [s for s in seen if not 200 <= s[2] < 300]
    assert not rejected, f"the spec rejected: {rejected}"
    for method, prefix in expected:
        assert any(m == method and p.startswith(prefix) for m, p, _, _ in seen), \
            f"no {method} {prefix} was sent: {seen}"


def examples():
    return [[{"role": "system", "content": "Classify the sentiment."},
             {"role": "user", "content": f"Profit rose {i}%."},
             {"role": "assistant", "content": "positive"}] for i in range(10)]


def test_fine_tuning_requests(backend, seen):
    config = FinetuneConfig(learning_rate_multiplier=0.1, seed=3)
    with pytest.raises(BackendError, match="still validating_files"):
        backend.finetune(MODEL, examples(), config, key="contract/warm-up")
    assert_all_accepted(seen, ("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/files"),
                        ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs/"))
    assert any(p.endswith("/events") for _, p, _, _ in seen)
    # resuming from the workdir record, continuing from an ft: model
    seen.clear()
    with pytest.raises(BackendError, match="still validating_files"):
        backend.finetune(MODEL, examples(), config, key="contract/warm-up")
    with pytest.raises(BackendError, match="still validating_files"):
        backend.finetune("ft:gpt-4o-mini-2024-07-18:org::abc", examples(), config,
                         key="contract/evolve")
    assert_all_accepted(seen, ("GET", "/v1/fine_tuning/jobs/"), ("POST", "/v1/fine_tuning/jobs"))


def test_chat_with_logprobs_and_n(backend, seen):
    prompts = [[{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "Sentiment of 'profit rose'?"}]] * 2
    out = backend.generate_with_logprobs(MODEL, prompts, n=1, temperature=1.0, max_tokens=8,
                                         seed=1)
    assert len(out) == 2 and len(out[0][0].tokens) == len(out[0][0].logprobs) >= 1
    # n=4 is accepted by the spec; Prism's static example has one choice, which we refuse
    with pytest.raises(BackendError, match="returned 1 choices"):
        backend.generate_with_logprobs(MODEL, prompts[:1], n=4, temperature=1.0, seed=2)
    assert_all_accepted(seen, ("POST", "/v1/chat/completions"))
    assert len([s for s in seen if s[1] == "/v1/chat/completions"]) == 3


def test_embeddings(backend, seen):
    vectors = backend.embed(["profit rose"])
    assert vectors.shape[0] == 1
    assert_all_accepted(seen, ("POST", "/v1/embeddings"))


def test_batch_requests(backend, seen):
    backend.batch_mode = True
    with pytest.raises(BackendError, match="still validating"):
        backend.generate_with_logprobs(MODEL, [[{"role": "user", "content": "hi"}]], n=2,
                                       max_tokens=4, seed=0)
    backend.batches.read_file("file-abc123")          # how results are downloaded
    assert_all_accepted(seen, ("POST", "/v1/files"), ("POST", "/v1/batches"),
                        ("GET", "/v1/batches/"), ("GET", "/v1/files/file-abc123/content"))


def test_malformed_requests_are_rejected_with_422(prism, backend, seen):
    """Proof that Prism validates: a request the spec forbids gets 422, through the SDK and
    through the backend's error translation."""
    client = openai.OpenAI(base_url=prism, api_key="sk-contract", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       n=0)
    with pytest.raises(openai.UnprocessableEntityError):
        client.fine_tuning.jobs.create(model=MODEL, training_file="file-1",
                                       method={"type": "bogus"})
    with pytest.raises(BackendError, match="HTTP 422"):
        backend.generate_with_logprobs(MODEL, [[{"role": "user", "content": "x"}]], n=0)
    assert [s[2] for s in seen] == [422]
