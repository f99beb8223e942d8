"""How tests serve `semievol serve`, in three ways, cheapest first:

- :func:`in_process`: the app in this process through Starlette's ``TestClient``, driven by
  the official openai SDK (``client()``) or plain httpx (``http``). No port, no subprocess:
  what most server tests use.
- :func:`served`: the app on a loopback port, uvicorn in a thread: real HTTP, for what needs
  a socket (a body that never comes, a keep-alive connection).
- :func:`running_server`: `semievol serve` as a subprocess, as users start it: for what is
  about the process (its command line, a restart of the real model, an SDK's wire).

And the data helpers the server tests share."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

API_KEY = "test-key"


# -- in process ----------------------------------------------------------------------------
class InProcess:
    """An app under ``TestClient``: ``http`` is the TestClient itself (paths relative to
    ``/v1/``, no key unless a request sends ``headers``); ``client()`` is the openai SDK
    over the same transport."""

    def __init__(self, http, api_key: str | None):
        self.http, self.api_key = http, api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key or self.api_key
                             or "no-key", http_client=self.http, max_retries=0)


@contextmanager
def in_process(backend, state_dir: Path, api_key: str | None = None, **options):
    """``semievol.server.create_app(backend, state_dir, api_key, **options)`` under
    ``TestClient`` (its lifespan runs: the fine-tuning worker starts and stops)."""
    from starlette.testclient import TestClient

    from semievol.server import create_app

    with TestClient(create_app(backend, state_dir, api_key, **options),
                    base_url="http://testserver/v1/") as http:
        yield InProcess(http, api_key)


def module_server(tmp_path_factory):
    """The body of a module's ``server`` fixture: one fake-backend server in process, with
    the key and a 1 MB upload limit."""
    with in_process(fake_backend(), tmp_path_factory.mktemp("server") / "state", API_KEY,
                    max_upload_mb=1) as server:
        yield server


def checked_client(server):
    """The body of a ``client`` fixture: the openai SDK on ``server``, which must still
    answer after the test, whatever it sent."""
    client = server.client()
    yield client
    assert client.models.list().data


def fake_backend():
    from semievol.backends import load_backend

    return load_backend("fake")


class GatedBackend:
    """The fake backend, except that ``finetune`` waits for ``gate``, so a job can be held
    in ``running`` while the test looks at the server."""

    name = "fake"

    def __init__(self):
        self.fake = fake_backend()
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


# -- on a port -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(app):
    """``app`` served by uvicorn on a loopback port, in a thread: real HTTP (keep-alive
    connections included) to a backend the test holds. Yields the port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
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


# -- as a process ----------------------------------------------------------------------------
def server_command(backend: str, port: int, state_dir: Path, *extra: str) -> list[str]:
    """The one place that says how tests start a server: as users do, `semievol serve`."""
    return [sys.executable, "-m", "semievol", "serve", "--backend", backend, "--port", str(port),
            "--state-dir", str(state_dir), *extra]


SERVER_ENV = {"OMP_NUM_THREADS": "1", **os.environ}
"""One torch thread unless the environment says otherwise: on two CPU cores shared with
other work, two spinning OpenMP threads made a LoRA step 30x slower (one: 1.5x slower)."""


class Running:
    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=300)


@contextmanager
def running_server(backend: str, state_dir: Path, *extra: str, ready_s: float = 120,
                   auth: tuple[str, ...] = ("--api-key", API_KEY)):
    """Start a server, wait until it answers, yield it, and stop it (SIGTERM, then kill)."""
    port = free_port()
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


# -- data ------------------------------------------------------------------------------------
def jsonl(rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def chat_rows(pairs) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in pairs]


TEN = chat_rows((f"question {i}?", f"answer {i}") for i in range(10))


def upload(client, rows, name="train.jsonl", purpose="fine-tune"):
    return client.files.create(file=(name, jsonl(rows)), purpose=purpose)


def wait(client, job_id: str, timeout: float = 30):
    """The job once it has finished (succeeded, failed or cancelled)."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job still {job.status} after {timeout} s"
        time.sleep(0.1 if timeout < 60 else 1.0)


def assert_openai_error(error: openai.APIStatusError, status: int, code=None, param=None):
    """``error`` has ``status`` and OpenAI's error body (with ``code`` and ``param``)."""
    assert error.status_code == status
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param",
                                                             "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param


def create_job(http, name: str = "train.jsonl") -> str:
    """Upload TEN and start a job on it through ``http`` (a TestClient of a server without
    a key); the job's id."""
    upload = http.post("files", files={"file": (name, jsonl(TEN))},
                       data={"purpose": "fine-tune"})
    job = http.post("fine_tuning/jobs", json={"model": "fake-base",
                                               "training_file": upload.json()["id"]})
    assert job.status_code == 200, job.text
    return job.json()["id"]


def job_status(http, job_id: str, until=None, timeout: float = 10) -> str:
    """The job's status: at once, or once it is ``until`` (or ``timeout`` has passed)."""
    deadline = time.monotonic() + timeout
    while True:
        status = http.get(f"fine_tuning/jobs/{job_id}").json()["status"]
        if until is None or status == until or time.monotonic() > deadline:
            return status
        time.sleep(0.02)
