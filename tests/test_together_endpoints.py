"""When Together will not serve a fine-tune serverless: `semievol run --backend together`
against a `semievol serve --backend fake --dedicated-lora`, which refuses its fine-tunes by
name with Together's own message and serves them only on a dedicated endpoint.

Without ``--together-endpoint`` the run stops right after the warm-up, before anything else
is spent, naming the flag and the hardware with its price per minute; with it, a rerun
reuses the warm-up (no second job), serves it on one endpoint, finishes, and deletes the
endpoints it made. The requests the backend sends for endpoints are checked against
Together's official API description (Prism) too."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from test_server import API_KEY, running_server
import test_together_contract
from test_together_contract import assert_all_accepted

from semievol.backends.together import TogetherBackend
from semievol.demo import make_task
from semievol.errors import BackendError

pytestmark = pytest.mark.slow
prism = test_together_contract.prism  # its Prism mock fixture, shared

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def listed(server, path: str) -> list[dict]:
    response = httpx.get(server.url + path, headers=AUTH, timeout=30)
    response.raise_for_status()
    return response.json()["data"]


def test_a_fine_tune_served_only_on_a_dedicated_endpoint(tmp_path):
    data = make_task(tmp_path / "data")
    out = tmp_path / "run"
    with running_server("fake", tmp_path / "state", "--dedicated-lora") as server:
        args = [sys.executable, "-m", "semievol", "run", "--data", str(data), "--backend",
                "together", "--base-url", server.url, "--model", "fake-base", "--quiet",
                "--out", str(out)]
        env = {**os.environ, "TOGETHER_API_KEY": API_KEY}
        first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        assert first.returncode != 0
        said = first.stdout + first.stderr
        assert "will not serve the fine-tune semievol/fake-base-" in said
        assert "non-serverless" in said and "--together-endpoint" in said
        assert "local $0.0000/minute" in said and "Nothing more was spent" in said
        assert len(listed(server, "/fine-tunes")) == 1 and not listed(server, "/endpoints")
        assert not list(out.glob("*mine*")) and not (out / "results.json").exists()

        second = subprocess.run(args + ["--together-endpoint", "auto"], capture_output=True,
                                text=True, env=env, timeout=600)
        assert second.returncode == 0, second.stdout + second.stderr
        results = json.loads((out / "results.json").read_text())
        made = {results["models"]["warm"], results["models"]["evolved"]}
        assert len(listed(server, "/fine-tunes")) == len(made)  # the warm-up was reused
        assert results["eval"]["sft"]["n"] > 0 and results["eval"]["semievol"]["n"] > 0
        assert not listed(server, "/endpoints")  # deleted at the end
        records = [json.loads(p.read_text())
                   for p in (out / "backend" / "endpoints").glob("*.json")]
        assert {r["model"] for r in records} == made
        assert all(r["deleted"] and r["hardware"] == "local" for r in records)
        for path in out.rglob("*"):
            if path.is_file():
                assert API_KEY not in path.read_text(errors="ignore")


def test_endpoint_requests_meet_togethers_spec(prism, tmp_path):
    """Hardware listing, endpoint creation, polling, start-up and deletion as the backend
    sends them, each accepted by Prism; the refusal message lists Prism's example price."""
    seen = []

    def record(response: httpx.Response):
        response.read()
        seen.append((response.request.method, response.request.url.path,
                     response.status_code, response.request.content, response.text))

    client = httpx.Client(event_hooks={"response": [record]})
    model = "semievol/Meta-Llama-3.1-8B-Instruct-Reference-ft"
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "warm.json").write_text(json.dumps(
        {"key": "warm", "output": model, "root": "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"}))
    backend = TogetherBackend(base_url=prism, api_key="tg-contract", workdir=tmp_path,
                              max_retries=0, timeout=30, poll_interval=0.05, max_wait=0.3,
                              quiet=True, http_client=client)
    api = backend.api.endpoints
    api._refused = "refused"
    with pytest.raises(BackendError, match=r"--together-endpoint.*\$0\.0542/minute"):
        api._create(backend, model)
    api.hardware = "auto"
    created = api._create(backend, model)
    assert created["usd_per_minute"] == pytest.approx(0.0542)
    api._endpoints[model] = created
    try:
        api._start(backend, created)
    except BackendError:  # Prism's example endpoint is STARTED; any state ends the wait
        pass
    api.close(backend)
    assert_all_accepted(seen, ("GET", "/v1/hardware"), ("GET", "/v1/endpoints"),
                        ("POST", "/v1/endpoints"), ("DELETE", "/v1/endpoints/"))
    create = json.loads(next(body for m, p, _, body, _ in seen
                             if m == "POST" and p == "/v1/endpoints"))
    assert create["model"] == model and create["inactive_timeout"] == 15
    assert json.loads((tmp_path / "endpoints").glob("*.json").__next__().read_text())["deleted"]
    client.close()
