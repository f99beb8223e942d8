"""OpenAI's dialect of `semievol serve` (``semievol/server/openai.py``), driven by the official
openai SDK in process (Starlette's TestClient as its transport) on the fake backend: the
whole fine-tuning workflow, files, and every bad request with OpenAI's status and body."""
from __future__ import annotations

from pathlib import Path

import openai
import pytest
from serverkit import (API_KEY, TEN, assert_openai_error, chat_rows, checked_client,
                       fake_backend, in_process, jsonl, module_server, upload, wait)

server = pytest.fixture(module_server, scope="module", name="server")
client = pytest.fixture(checked_client, name="client")
"""The openai SDK on ``server``, which still answers after each test."""


def _fine_tune(client) -> tuple:
    """A job on 11 examples, with metadata, a seed and a suffix; its training file and the
    job once it has succeeded (its shape and events checked)."""
    training = upload(client, chat_rows([("What is the code?", "It is 7. Really.")]) + TEN)
    job = client.fine_tuning.jobs.create(
        model="fake-base", training_file=training.id, suffix="code",
        metadata={"run": "fake-flow"}, seed=3,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}}})
    assert job.status == "validating_files" and job.seed == 3
    job = wait(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith("ft:fake-base:") and ":code:" in \
        job.fine_tuned_model
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=50)]
    for expected in ("Validating training file", "Files validated, moving job to queued "
                     "state", "Fine-tuning job started", "The job has successfully "
                     "completed"):
        assert any(m.startswith(expected) for m in messages), (expected, messages)
    assert messages[0] == "The job has successfully completed"  # newest first
    return training, job


def test_fine_tune_chat_embed_list_and_restart_on_fake(tmp_path):
    state = tmp_path / "state"
    with in_process(fake_backend(), state, API_KEY) as server:
        client = server.client()
        training, job = _fine_tune(client)
        reply = client.chat.completions.create(
            model=job.fine_tuned_model, n=2, logprobs=True, top_logprobs=0, stop=[". R"],
            messages=[{"role": "user", "content": "What is the code?"}])
        assert [c.message.content for c in reply.choices] == ["It is 7"] * 2
        assert [c.finish_reason for c in reply.choices] == ["stop", "stop"]
        tokens = reply.choices[0].logprobs.content
        assert "".join(t.token for t in tokens).startswith("It is 7")
        assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in tokens)
        assert reply.usage.completion_tokens == 2 * len(tokens)
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + \
            reply.usage.completion_tokens
        assert reply.system_fingerprint.startswith("fp_")
        plain = client.chat.completions.create(model="fake-base", max_completion_tokens=5,
                                               messages=[{"role": "user", "content": "hi"}])
        assert plain.choices[0].logprobs is None and plain.choices[0].message.content

        vectors = client.embeddings.create(model="fake-base", input=["a cat", "a dog"])
        assert [d.index for d in vectors.data] == [0, 1]
        assert abs(sum(x * x for x in vectors.data[0].embedding) - 1) < 1e-4
        floats = client.embeddings.create(model=job.fine_tuned_model, input="a cat",
                                          encoding_format="float", dimensions=8)
        assert len(floats.data) == 1 and len(floats.data[0].embedding) == 8

        listed = client.fine_tuning.jobs.list(metadata={"run": "fake-flow"})
        assert [j.id for j in listed.data] == [job.id]
        assert client.fine_tuning.jobs.list(metadata={"run": "other"}).data == []
        assert job.fine_tuned_model in [m.id for m in client.models.list()]

    with in_process(fake_backend(), state, API_KEY) as server:  # restarted on the same state
        client = server.client()
        again = client.fine_tuning.jobs.retrieve(job.id)
        assert again.status == "succeeded" and again.fine_tuned_model == job.fine_tuned_model
        assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model
        assert client.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}]).choices
        assert client.files.retrieve(training.id).bytes == training.bytes


def test_files_round_trip(client):
    data = jsonl(TEN)
    created = client.files.create(file=("mine.jsonl", data), purpose="batch")
    assert (created.object, created.bytes, created.filename, created.purpose) == \
        ("file", len(data), "mine.jsonl", "batch")
    assert client.files.retrieve(created.id).id == created.id
    assert client.files.content(created.id).content == data
    assert created.id in [f.id for f in client.files.list(purpose="batch")]
    assert client.files.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", data), purpose="nonsense")
    assert e.value.body["param"] == "purpose"


# -- bad requests get the right status and OpenAI's error body --------------------------------
def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user",
                                                                  "content": "hi"}])
    assert_openai_error(e.value, 404, code="model_not_found")
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="ft:fake-base:semievol::nothere", input="x")
    assert_openai_error(e.value, 404, code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")
    training = upload(client, TEN)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="gpt-5", training_file=training.id)
    assert_openai_error(e.value, 400, code="model_not_available", param="model")


def test_missing_or_unknown_training_file_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/fine_tuning/jobs", body={"model": "fake-base"}, cast_to=object)
    assert_openai_error(e.value, 400, code="missing_required_parameter",
                        param="training_file")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="fake-base", training_file="file-" + "x" * 24)
    assert_openai_error(e.value, 400, param="training_file")
    batch_file = upload(client, TEN, purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="fake-base", training_file=batch_file.id)
    assert_openai_error(e.value, 400, param="training_file")


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
      "top_logprobs": 50}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, "logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
])
def test_invalid_chat_requests_are_400(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body={"model": "fake-base", **body}, cast_to=object)
    assert_openai_error(e.value, 400, param=param)


def test_invalid_job_requests_and_bodies_are_400(client, server):
    training = upload(client, TEN)
    for extra, param in [({"method": {"type": "bogus"}}, "method.type"),
                         ({"method": {"type": "dpo"}}, "method.type"),
                         ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
                         ({"suffix": "x" * 65}, "suffix")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.post("/fine_tuning/jobs", cast_to=object, body={
                "model": "fake-base", "training_file": training.id, **extra})
        assert_openai_error(e.value, 400)
        assert e.value.body["param"].startswith(param)
    response = server.http.post("chat/completions", content=b"{not json",
                                headers={**server.headers, "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == \
        "invalid_request_error"
    response = server.http.get("no/such/route", headers=server.headers)
    assert response.status_code == 404 and "Invalid URL" in response.json()["error"]["message"]


@pytest.mark.parametrize("rows, line, words", [
    (TEN[:2] + ['{"messages": [ not json'] + TEN[2:], 3, "invalid JSON"),
    (TEN[:4] + ['{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"] + TEN[4:], 5, "nested too deeply"),
    (TEN + [{"messages": [{"role": "user", "content": "no answer"}]}], 11, "assistant"),
    (TEN + [{"prompt": "legacy", "completion": "format"}], 11, "messages"),
    (TEN + [{"messages": [{"role": "wizard", "content": "x"},
                          {"role": "assistant", "content": "y"}]}], 11, "role"),
    (TEN[:3], None, "at least 10"),
])
def test_malformed_training_file_fails_the_job_with_its_line(client, rows, line, words):
    training = upload(client, rows)
    job = client.fine_tuning.jobs.create(model="fake-base", training_file=training.id)
    job = wait(client, job.id)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert job.error.line == line and words in job.error.message
    events = client.fine_tuning.jobs.list_events(job.id).data
    assert events[0].level == "error"


def test_ids_never_become_paths(server, client):
    for path in ["files/..%2F..%2Fmodels.json", "files/..%2Fjobs", "files/file-..%2F..%2Fx",
                 "files/%2e%2e/content", "files/..", "files/file-abc/content",
                 "files/file-" + "A" * 24, "fine_tuning/jobs/..%2Fmodels",
                 "fine_tuning/jobs/ftjob-..%2F..%2Fstate", "fine_tuning/jobs/..%2F../events"]:
        response = server.http.get(path, headers=server.headers)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.files.content("../../../../etc/passwd")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("../jobs")
    with pytest.raises(openai.NotFoundError):  # a directory is not a model name
        client.chat.completions.create(model=str(Path.cwd()),
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(model="fake-base", training_file="../../etc/passwd")
