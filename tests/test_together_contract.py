"""Contract tests: every request the together backend sends is one Together's official API
description accepts.

A Prism mock of ``../shared/together-openapi/openapi.mock.json`` checks each request's shape
against the spec and answers with its examples. The backend's real methods run against it
through the real SDK; an ``httpx`` event hook records every response, and all must be 2xx.
Malformed requests in the same suite must be refused (4xx), proving validation is on.
Prism answers static examples (a job that never finishes, one chat choice, model limits of
zero), so waits are bounded with ``max_wait``, those outcomes are expected, not failures,
and the zero limits are replaced by stated ones after Prism accepted the request.

Two requests meet known defects of the spec, and the tests pin that the spec's objection
is that defect and nothing else:

- Continuing from a checkpoint: the spec marks ``model`` required on ``POST
  /v1/fine-tunes``, while the SDK refuses ``model`` together with ``from_checkpoint``
  ("either a model or a checkpoint, not both") and the API docs continue a job with
  ``from_checkpoint`` alone. The backend follows the SDK.
- The cosine schedule (the paper's, FinetuneConfig's default): the SDK sends
  ``lr_scheduler_args: {min_lr_ratio, num_cycles}``, which matches both branches of the
  spec's ``oneOf`` (the linear branch does not forbid extra properties), so it fails
  "exactly one". With ``lr_scheduler="linear"`` the same request is accepted.
"""
from __future__ import annotations

import json

import httpx
import pytest
import together
from test_openai_contract import REPO, prism_mock
from test_together_backend import LIMITS

from semievol.backends.together import DEFAULT_MODEL as MODEL
from semievol.backends.together import TogetherBackend
from semievol.config import FinetuneConfig
from semievol.errors import BackendError

SPEC = REPO.parent / "shared" / "together-openapi" / "openapi.mock.json"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prism(tmp_path_factory):
    with prism_mock(SPEC, tmp_path_factory.mktemp("prism-together")) as url:
        yield url


class StatedLimits(httpx.HTTPTransport):
    """Prism answers ``/v1/fine-tunes/models/limits`` with zeros (the spec gives no examples),
    which the SDK itself then refuses ("batch size 8 is higher than the maximum 0"). The
    request still goes to Prism and is checked like every other; only a 200 answer is
    replaced by limits as Together states them for a Llama-3.1-8B model."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path == "/v1/fine-tunes/models/limits" and response.status_code == 200:
            response.read()
            return httpx.Response(200, json=LIMITS, request=request)
        return response


@pytest.fixture
def seen():
    """(method, path, status, body, error text) of every response the backend received."""
    return []


@pytest.fixture
def backend(prism, seen, tmp_path):
    def record(response: httpx.Response):
        response.read()
        request = response.request
        error = response.text if response.status_code >= 400 else ""
        try:
            body = request.content
        except httpx.RequestNotRead:  # a streamed multipart upload
            body = b""
        seen.append((request.method, request.url.path, response.status_code, body, error))

    client = httpx.Client(event_hooks={"response": [record]}, transport=StatedLimits())
    yield TogetherBackend(MODEL, base_url=prism, api_key="tg-contract", workdir=tmp_path,
                          max_retries=0, timeout=30, poll_interval=0.05, max_wait=0.3,
                          quiet=True, http_client=client)
    client.close()


def assert_all_accepted(seen, *expected):
    rejected = [(m, p, s, e) for m, p, s, _, e in seen if not 200 <= s < 300]
    assert not rejected, f"the spec rejected: {rejected}"
    for method, prefix in expected:
        assert any(m == method and p.startswith(prefix) for m, p, *_ in seen), \
            f"no {method} {prefix} was sent: {[(m, p) for m, p, *_ in seen]}"


def examples():
    return [[{"role": "system", "content": "Classify the sentiment."},
             {"role": "user", "content": f"Profit rose {i}%."},
             {"role": "assistant", "content": "positive"}] for i in range(10)]


LINEAR = FinetuneConfig(seed=3, batch_size=8, lr_scheduler="linear")


def test_fine_tuning_requests(backend, seen):
    config = LINEAR
    with pytest.raises(BackendError, match="still"):
        backend.finetune(MODEL, examples(), config, key="contract/warm-up")
    assert_all_accepted(seen, ("GET", "/v1/fine-tunes"), ("GET", "/v1/fine-tunes/models/limits"),
                        ("POST", "/v1/files/upload"), ("POST", "/v1/fine-tunes/estimate-price"),
                        ("POST", "/v1/fine-tunes"), ("GET", "/v1/fine-tunes/"))
    assert any(p.endswith("/events") for _, p, *_ in seen)
    create = next(body for m, p, _, body, _ in seen if m == "POST" and p == "/v1/fine-tunes")
    assert json.loads(create)["training_type"]["type"] == "Lora"
    # resuming from the workdir record: a retrieve, no second create
    seen.clear()
    with pytest.raises(BackendError, match="still"):
        backend.finetune(MODEL, examples(), config, key="contract/warm-up")
    assert_all_accepted(seen, ("GET", "/v1/fine-tunes/"))
    assert not any(m == "POST" and p == "/v1/fine-tunes" for m, p, *_ in seen)


def test_continuing_from_a_checkpoint(prism, backend, seen, tmp_path):
    """The evolve step's create: all else accepted; the spec's only objection is the
    ``model`` the SDK forbids beside ``from_checkpoint`` (see the module docstring)."""
    warm = "user/Meta-Llama-3.1-8B-Instruct-Reference-semievol-warm"
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "warm.json").write_text(json.dumps(
        {"key": "warm", "job_id": "ft-warm", "status": "completed", "output": warm,
         "base": MODEL, "root": MODEL}))
    with pytest.raises(BackendError, match="HTTP 4"):
        backend.finetune(warm, examples(), LINEAR, key="contract/evolve")
    create = [(s, body, e) for m, p, s, body, e in seen if m == "POST" and p == "/v1/fine-tunes"]
    others = [s for s in seen if not (s[0] == "POST" and s[1] == "/v1/fine-tunes")]
    assert_all_accepted(others, ("POST", "/v1/fine-tunes/estimate-price"))
    estimate = next(b for m, p, _, b, _ in seen if p == "/v1/fine-tunes/estimate-price")
    assert json.loads(estimate)["from_checkpoint"] == warm
    [(status, body, error)] = create
    assert status == 422 and "model" in error
    body = json.loads(body)
    assert body["from_checkpoint"] == warm and "model" not in body
    answer = httpx.post(prism + "/fine-tunes", json={**body, "model": MODEL},
                        headers={"Authorization": "Bearer tg-contract"})
    assert answer.status_code == 200, answer.text


def test_cosine_schedule_meets_the_specs_ambiguous_one_of(prism, backend, seen):
    with pytest.raises(BackendError, match="HTTP 422"):
        backend.finetune(MODEL, examples(), FinetuneConfig(batch_size=8), key="contract/cosine")
    [(status, body, error)] = [(s, b, e) for m, p, s, b, e in seen
                               if m == "POST" and p == "/v1/fine-tunes"]
    validation = json.loads(error)["validation"]
    assert [v["location"] for v in validation] == [["body", "lr_scheduler", "lr_scheduler_args"]]
    assert validation[0]["code"] == "oneOf"
    assert json.loads(body)["lr_scheduler"]["lr_scheduler_args"] == {"min_lr_ratio": 0.0,
                                                                     "num_cycles": 0.5}


def test_chat_with_integer_logprobs_and_n(backend, seen):
    prompts = [[{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "Sentiment of 'profit rose'?"}]] * 2
    try:
        out = backend.generate_with_logprobs(MODEL, prompts, n=1, temperature=1.0,
                                             max_tokens=8, seed=1)
        assert len(out) == 2 and len(out[0][0].tokens) == len(out[0][0].logprobs)
    except BackendError as e:  # Prism's example may carry text without logprobs
        assert "logprobs" in str(e)
    with pytest.raises(BackendError):  # n=4 is accepted; Prism's example has fewer choices
        backend.generate_with_logprobs(MODEL, prompts[:1], n=4, temperature=1.0, seed=2)
    assert_all_accepted(seen, ("POST", "/v1/chat/completions"))
    sent = [json.loads(body) for m, p, _, body, _ in seen if p == "/v1/chat/completions"]
    assert len(sent) == 3 and all(b["logprobs"] == 1 for b in sent)
    assert [b["n"] for b in sent] == [1, 1, 4]


def test_embeddings(backend, seen):
    vectors = backend.embed(["profit rose"])
    assert vectors.shape[0] == 1
    assert_all_accepted(seen, ("POST", "/v1/embeddings"))


def test_malformed_requests_are_rejected(prism, backend, seen):
    """Proof that Prism validates: requests the spec forbids are refused, through the SDK
    and through the backend's error translation."""
    client = together.Together(base_url=prism.removesuffix("/v1"), api_key="tg-contract",
                               max_retries=0)
    with pytest.raises(together.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       logprobs=True)       # a boolean: OpenAI's, not Together's
    assert 400 <= e.value.status_code < 500
    with pytest.raises(together.APIStatusError) as e:
        client.post("/v1/fine-tunes", cast_to=object, body={"model": MODEL})  # no training_file
    assert 400 <= e.value.status_code < 500
    with pytest.raises(BackendError, match="HTTP 4"):
        backend.generate_with_logprobs(MODEL, [[{"role": "user", "content": "x"}]], n=0)
    assert [s[2] // 100 for s in seen] == [4]
