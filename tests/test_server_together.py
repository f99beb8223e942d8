"""Together's dialect of `semievol serve` (``semievol/server/together.py``) where it meets the
shared layers, by its two hooks: a chat request with Together's integer ``logprobs`` is
answered in Together's shape, and a model name resolves to a started dedicated endpoint
(with ``dedicated_lora``, a Together fine-tune only there). In process (TestClient); the
together SDK over real HTTP is tests/test_together_backend.py."""
from __future__ import annotations

import pytest
from serverkit import API_KEY, TEN, fake_backend, in_process, upload, wait

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def server(tmp_path):
    with in_process(fake_backend(), tmp_path / "state", API_KEY, dedicated_lora=True) as server:
        yield server


def post(server, path: str, body: dict):
    return server.http.post(path, json=body, headers=server.headers)


def test_an_integer_logprobs_is_answered_in_togethers_shape(server):
    together = post(server, "chat/completions", {"model": "fake-base", "messages": HI,
                                                 "logprobs": 1, "n": 2}).json()
    assert list(together)[-1] == "prompt" and together["prompt"] == []
    for index, choice in enumerate(together["choices"]):
        assert choice["index"] == index and set(choice["message"]) == {"role", "content"}
        part = choice["logprobs"]
        assert set(part) == {"tokens", "token_logprobs"}
        assert len(part["tokens"]) == len(part["token_logprobs"]) >= 1
    for openai_style in (True, False):
        answer = post(server, "chat/completions", {"model": "fake-base", "messages": HI,
                                                   "logprobs": openai_style}).json()
        assert "prompt" not in answer and "refusal" in answer["choices"][0]["message"]
        assert (answer["choices"][0]["logprobs"] is not None) == openai_style


def test_a_together_fine_tune_is_served_only_on_its_started_endpoint(server):
    """``dedicated_lora``: Together's fine-tunes are refused by name (OpenAI's ``ft:`` ones
    are not) and served by a dedicated endpoint's name once it has STARTED."""
    client = server.client()
    training = upload(client, TEN)
    job = post(server, "fine-tunes", {"model": "fake-base", "training_file": training.id})
    made = wait(client, job.json()["id"]).fine_tuned_model
    assert made.startswith("semievol/fake-base-")
    openai_job = client.fine_tuning.jobs.create(model="fake-base", training_file=training.id)
    served = wait(client, openai_job.id).fine_tuned_model  # an ft: name: served by name
    assert post(server, "chat/completions", {"model": served, "messages": HI}).json()["choices"]
    refused = post(server, "chat/completions", {"model": made, "messages": HI})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "model_not_available"
    assert "non-serverless" in refused.json()["error"]["message"]

    endpoint = post(server, "endpoints", {"model": made, "hardware": "local",
                                         "autoscaling": {"min_replicas": 1}}).json()
    assert endpoint["state"] == "PENDING"
    by_name = {"model": endpoint["name"], "messages": HI}
    assert post(server, "chat/completions", by_name).status_code == 404   # not started yet
    started = server.http.get(f"endpoints/{endpoint['id']}", headers=server.headers).json()
    assert started["state"] == "STARTED"
    assert post(server, "chat/completions", by_name).json()["choices"]
    assert post(server, "embeddings", {"model": endpoint["name"], "input": "x"}).json()["data"]
