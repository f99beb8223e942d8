"""The HTTP plumbing of `semievol serve` (``semievol/server/http.py``): the key checked from
the headers alone, body limits, OpenAI's error body for what no route expected, a
connection kept after a 500. In process (TestClient), except where a socket is the point:
there uvicorn serves the app in a thread."""
from __future__ import annotations

import http.client
import json
import logging
import shutil
import socket

import openai
import pytest
from serverkit import (API_KEY, TEN, GatedBackend, assert_openai_error, checked_client,
                       fake_backend, in_process, jsonl, module_server, served, upload)

server = pytest.fixture(module_server, scope="module", name="server")
client = pytest.fixture(checked_client, name="client")
"""The openai SDK on ``server``, which still answers after each test."""


# -- auth ----------------------------------------------------------------------------------
@pytest.mark.parametrize("auth", [b"", b"Authorization: Bearer wrong\r\n"])
def test_an_unauthenticated_upload_is_refused_before_its_body_is_read(tmp_path, auth):
    """Headers announce a 900 kB upload (under the 1 MB limit) and no body follows: the
    server must answer 401 from the headers alone, not wait to read (or spool) the body."""
    from semievol.server import create_app

    request = (b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth +
               b"Content-Type: multipart/form-data; boundary=x\r\n"
               b"Content-Length: 900000\r\n\r\n")
    app = create_app(fake_backend(), tmp_path / "state", API_KEY, max_upload_mb=1)
    with served(app) as port, socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        reply = b""
        while b"API key" not in reply and (chunk := conn.recv(65536)):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 401") and b"API key" in reply, reply[:300]


def test_wrong_or_missing_api_key_is_401(server, client):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(api_key="wrong").models.list()
    assert_openai_error(e.value, 401, code="invalid_api_key")
    response = server.http.get("models")
    assert response.status_code == 401 and response.json()["error"]["message"]
    response = server.http.post("files", headers={"Authorization": "Basic x"})
    assert response.status_code == 401


# -- bodies --------------------------------------------------------------------------------
def test_deeply_nested_json_body_is_400(server, client):
    body = b'{"model": "fake-base", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = server.http.post("chat/completions", content=body,
                                headers={**server.headers, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_oversize_upload_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * (3 * 2**20 // 2)), purpose="fine-tune")
    assert_openai_error(e.value, 413)
    # Just over the limit, inside the request slack: refused while copying the upload.
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=("big.jsonl", b"x" * (2**20 + 10)), purpose="fine-tune")
    assert_openai_error(e.value, 413)
    assert client.files.create(file=("ok.jsonl", b"x" * 2**20), purpose="batch").bytes == 2**20


# -- what no route expected ----------------------------------------------------------------
class BrokenEmbedder(GatedBackend):
    """The fake backend, except that ``embed`` fails as no route expects."""

    def embed(self, texts):
        raise RuntimeError("the embedder broke")


def test_after_an_unexpected_500_the_keep_alive_connection_still_serves(tmp_path, caplog):
    """Issue 25, break 3: a handler for every exception sat on Starlette's
    ServerErrorMiddleware, which raises again after answering, so uvicorn closed the
    connection and the next request on it was reset; and the error was logged without its
    traceback (``log.exception`` outside an ``except``)."""
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


def test_a_disk_error_is_one_line_without_the_path_and_the_server_keeps_serving(tmp_path,
                                                                                 caplog):
    """Issue 25, break 5 on the server: a write the disk refuses (here files/ stops being a
    directory) is a 500 that says why without the state's path, one log line that names the
    path, and no traceback; once the disk is fixed the same upload works."""
    caplog.set_level(logging.INFO)
    state = tmp_path / "state"
    with in_process(fake_backend(), state, API_KEY) as server:
        client = server.client()
        shutil.rmtree(state / "files")
        (state / "files").write_text("not a directory")
        with pytest.raises(openai.InternalServerError) as e:
            upload(client, TEN)
        assert_openai_error(e.value, 500)
        assert "Not a directory" in e.value.body["message"]
        assert str(tmp_path) not in e.value.response.text
        (state / "files").unlink()
        (state / "files").mkdir()
        assert upload(client, TEN).bytes == len(jsonl(TEN))
    log = caplog.text
    assert "Traceback" not in log
    assert [line for line in log.splitlines() if "Not a directory" in line and
            str(state / "files") in line and "POST /v1/files" in line], log
