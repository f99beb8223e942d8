"""The together backend through the real ``together`` SDK: over real HTTP against `semievol
serve --backend fake` (which speaks Together's dialect beside OpenAI's), and through the one
fault-injecting transport (``transport.py``) with a scripted account for what a real account
does that a local server does not (prices, refusals, failures) and for the network's faults
(429 and 5xx retried, a lost answer, a stalled server). Nothing patches the SDK."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
from test_server import API_KEY, running_server
from transport import Fault, Transport

from semievol.backends import load_backend
from semievol.backends.together import TogetherBackend, _suffix
from semievol.config import FinetuneConfig
from semievol.errors import BackendError, BudgetExceeded, ConfigError, DataError, FinetuneFailed

MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"


def examples(n=10):
    return [[{"role": "system", "content": "Classify the sentiment."},
             {"role": "user", "content": f"Profit rose {i}%."},
             {"role": "assistant", "content": "positive"}] for i in range(n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server("fake", tmp_path_factory.mktemp("together") / "state") as running:
        yield running


def backend_for(server, workdir, **options) -> TogetherBackend:
    return TogetherBackend("fake-base", base_url=server.url, api_key=API_KEY, workdir=workdir,
                           poll_interval=0.05, max_retries=0, quiet=True, **options)


def jobs_on(server) -> list[dict]:
    response = httpx.get(server.url + "/fine-tunes",
                         headers={"Authorization": f"Bearer {API_KEY}"})
    response.raise_for_status()
    return response.json()["data"]


# -- against semievol serve (fake backend) ---------------------------------------------------
def test_finetune_continue_generate_embed(server, tmp_path):
    backend = backend_for(server, tmp_path)
    config = FinetuneConfig(epochs=2, lora_rank=8, learning_rate=2e-4, seed=5)
    before = len(jobs_on(server))
    warm = backend.finetune("fake-base", examples(), config, key="run1-warmup")
    assert warm.startswith("semievol/fake-base-semievol-")
    evolved = backend.finetune(warm, examples(12), config, key="run1-evolve-r1")
    assert evolved != warm
    listed = jobs_on(server)
    assert len(listed) == before + 2
    by_output = {j["model_output_name"]: j for j in listed}
    assert by_output[warm]["training_type"]["lora_r"] == 8
    assert by_output[warm]["learning_rate"] == 2e-4 and by_output[warm]["random_seed"] == 5
    assert by_output[warm]["suffix"] == _suffix("run1-warmup")
    assert by_output[evolved]["from_checkpoint"] == warm          # evolve continues warm-up
    assert by_output[evolved]["model"] == "fake-base"
    record = json.loads(next((tmp_path / "jobs").glob("run1-warmup-*.json")).read_text())
    assert record["output"] == warm and record["status"] == "completed"

    # the same key again: the recorded job, no new job
    assert backend.finetune("fake-base", examples(), config, key="run1-warmup") == warm
    # and with the record lost: found by its suffix on the server, no new job
    assert backend_for(server, tmp_path / "elsewhere").finetune(
        "fake-base", examples(), config, key="run1-warmup") == warm
    assert len(jobs_on(server)) == before + 2

    prompts = [[{"role": "user", "content": "Profit rose 3%. Sentiment?"}]] * 3
    out = backend.generate_with_logprobs(evolved, prompts, n=4, temperature=1.0, max_tokens=8,
                                         seed=1)
    assert [len(g) for g in out] == [4, 4, 4]
    for gen in out[0]:
        assert len(gen.tokens) == len(gen.logprobs) >= 1 and gen.entropy >= 0
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    assert out.usage.cost_usd is None                            # a local model has no price

    vectors = backend.embed(["profit rose", "profit fell", "shares flat"])
    assert vectors.shape[0] == 3
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_load_backend_and_key(server, tmp_path, monkeypatch):
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="TOGETHER_API_KEY"):
        load_backend("together")
    local = load_backend("together", base_url="http://127.0.0.1:9/v1")   # loopback: no key
    assert local.base_url.rstrip("/") == "http://127.0.0.1:9"
    assert load_backend("together", api_key="k" * 20).default_model == MODEL


def test_wrong_key_is_a_clear_error_without_the_key(server, tmp_path):
    backend = TogetherBackend("fake-base", base_url=server.url, api_key="tg-wrong-key-12345",
                              max_retries=0, quiet=True)
    with pytest.raises(BackendError, match="refused the API key") as e:
        backend.embed(["x"])
    assert "tg-wrong-key-12345" not in str(e.value)


def test_invalid_data_and_limits_fail_before_upload(server, tmp_path):
    backend = backend_for(server, tmp_path)
    before = len(jobs_on(server))
    bad = examples() + [[{"role": "user", "content": "no answer"}]]
    with pytest.raises(DataError, match="example 10: no assistant message"):
        backend.finetune("fake-base", bad, FinetuneConfig(), key="bad-data")
    weird = examples() + [[{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]]
    with pytest.raises(DataError, match="invalid for Together fine-tuning"):
        backend.finetune("fake-base", weird, FinetuneConfig(), key="bad-content")
    with pytest.raises(ConfigError, match="LoRA rank 128 is outside 1..64"):
        backend.finetune("fake-base", examples(), FinetuneConfig(lora_rank=128), key="bad-rank")
    with pytest.raises(ConfigError, match="whole number of epochs"):
        backend.finetune("fake-base", examples(), FinetuneConfig(epochs=1.5), key="bad-epochs")
    assert len(jobs_on(server)) == before
    assert not list((tmp_path / "jobs").glob("*.json"))         # nothing uploaded


def test_server_refuses_malformed_together_requests(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    post = lambda path, body: httpx.post(server.url + path, json=body, headers=headers)  # noqa: E731
    assert post("/fine-tunes", {"model": "fake-base"}).status_code == 400     # no training_file
    assert post("/fine-tunes", {"training_file": "file-x", "model": "fake-base",
                                "training_type": {"type": "Full"}}).status_code == 400
    assert post("/fine-tunes", {"training_file": "file-x", "model": "fake-base",
                                "from_checkpoint": "ftjob-x"}).status_code == 400
    chat = {"model": "fake-base", "messages": [{"role": "user", "content": "hi"}]}
    assert post("/chat/completions", {**chat, "logprobs": 21}).status_code == 400
    ok = post("/chat/completions", {**chat, "logprobs": 1, "n": 2})
    assert ok.status_code == 200 and "prompt" in ok.json()
    part = ok.json()["choices"][0]["logprobs"]
    assert len(part["tokens"]) == len(part["token_logprobs"]) >= 1
    openai_style = post("/chat/completions", {**chat, "logprobs": True}).json()
    assert "content" in openai_style["choices"][0]["logprobs"]


# -- what a real account does: a scripted account behind the transport -------------------------
LIMITS = {"model_name": MODEL, "default_gradient_accumulation_steps": 1,
          "lora_training": {"default_rank": 8, "max_rank": 64, "min_batch_size": 8,
                            "max_batch_size": 32, "max_batch_size_dpo": 8,
                            "target_modules": ["all-linear"]},
          "max_learning_rate": 1, "min_learning_rate": 1e-8, "max_num_checkpoints": 1,
          "max_num_epochs": 20, "max_num_evals": 0, "max_seq_length_dpo": 8192,
          "max_seq_length_sft": 8192, "merge_output_lora": False, "min_max_seq_length": 1,
          "supports_full_training": True, "supports_reasoning": False, "supports_tools": False,
          "supports_vision": False}


class Account:
    """A scripted Together account, a world for :class:`transport.Transport`
    (``self.transport``): records requests, answers them."""

    def __init__(self, *, allowed=True, price=0.05, final="completed"):
        self.requests: list[httpx.Request] = []
        self.allowed, self.price, self.final = allowed, price, final
        self.jobs: dict[str, dict] = {}
        self.transport = Transport(self, httpx)

    def __call__(self, request: httpx.Request):
        self.requests.append(request)
        path = request.url.path
        if path == "/v1/fine-tunes/models/limits":
            return LIMITS
        if path == "/v1/files/upload":
            return {"id": "file-1", "object": "file", "bytes": 1, "created_at": 0,
                    "filename": "t.jsonl", "purpose": "fine-tune", "FileType": "jsonl",
                    "Processed": True}
        if path == "/v1/fine-tunes/estimate-price":
            return {"estimation_available": True, "estimated_total_price": self.price,
                    "allowed_to_proceed": self.allowed, "user_limit": 1.0}
        if path == "/v1/fine-tunes" and request.method == "GET":
            return {"data": list(self.jobs.values())}
        if path == "/v1/fine-tunes":
            job = {"id": f"ft-{len(self.jobs) + 1}", "status": "pending",
                   "created_at": "2026-11-01T00:00:00Z", "updated_at": "2026-11-01T00:00:00Z",
                   "user_id": "u", "model": MODEL,
                   "suffix": json.loads(request.content)["suffix"],
                   "model_output_name": "u/Meta-Llama-3.1-8B-Instruct-Reference-x"}
            self.jobs[job["id"]] = job
            return job
        if path == "/v1/fine-tunes/ft-1":
            return {**self.jobs["ft-1"], "status": self.final, "token_count": 1000,
                    "total_price": 480_000}
        if path == "/v1/fine-tunes/ft-1/events":
            return {"data": [
                {"object": "fine-tune-event", "created_at": "2026-11-01T00:00:01Z",
                 "message": "Training started", "type": "training_start", "level": "info",
                 "step": 3, "total_steps": 10},
                {"object": "fine-tune-event", "created_at": "2026-11-01T00:00:02Z",
                 "message": "CUDA out of memory", "type": "job_error", "level": "error"}]}
        return 404, {"error": {"message": f"no {path}"}}


def account_backend(account, tmp_path, **options) -> TogetherBackend:
    options = {"max_retries": 0, **options}
    return TogetherBackend(MODEL, api_key="tg-secret-key-0123456789", workdir=tmp_path,
                           base_url="https://api.together.ai", quiet=True, poll_interval=0.01,
                           http_client=account.transport.client(), **options)


def creates(account) -> list[dict]:
    """The bodies of the job creations the account saw."""
    return [json.loads(r.content) for r in account.requests
            if r.url.path == "/v1/fine-tunes" and r.method == "POST"]


def test_job_request_and_price_from_the_account(tmp_path):
    account = Account()
    backend = account_backend(account, tmp_path)
    model = backend.finetune(MODEL, examples(), FinetuneConfig(batch_size=8, seed=7), key="k")
    assert model == "u/Meta-Llama-3.1-8B-Instruct-Reference-x"
    body = creates(account)[0]
    assert body["training_type"] == {"type": "Lora", "lora_r": 16, "lora_alpha": 32,
                                     "lora_dropout": 0.05, "lora_trainable_modules": "all-linear"}
    assert (body["model"], body["n_epochs"], body["learning_rate"], body["batch_size"],
            body["random_seed"], body["suffix"]) == (MODEL, 2, 1e-4, 8, 7, _suffix("k"))
    assert len(body["suffix"]) <= 40
    assert model.usage.trained_tokens == 1000
    assert model.usage.cost_usd == pytest.approx(0.00048)       # total_price in nanodollars
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert "tg-secret-key" not in path.read_text()


def test_report_to_wandb_passes_the_wandb_settings_on_the_job_only(tmp_path, monkeypatch):
    """Issue 27: with --report-to wandb Together logs the job's training to W&B itself;
    the W&B key goes in the job request and nowhere in the work directory."""
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-0123456789")
    monkeypatch.setenv("WANDB_PROJECT", "evolving")
    account = Account()
    backend = account_backend(account, tmp_path, report_to=("wandb",))
    backend.finetune(MODEL, examples(), FinetuneConfig(batch_size=8), key="k")
    body = creates(account)[0]
    assert (body["wandb_key"], body["wandb_project_name"]) == \
        ("wandb-secret-0123456789", "evolving")
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert "wandb-secret" not in path.read_text()
    plain = Account()
    account_backend(plain, tmp_path / "plain").finetune(MODEL, examples(),
                                                        FinetuneConfig(batch_size=8), key="k")
    body = creates(plain)[0]
    assert not any(k.startswith("wandb") for k in body)


def test_budget_and_credit_stop_before_a_job(tmp_path):
    account = Account(price=3.0)
    with pytest.raises(BudgetExceeded, match="Together's estimate"):
        account_backend(account, tmp_path, max_cost_usd=1.0).finetune(
            MODEL, examples(), FinetuneConfig(), key="k")
    account = Account(allowed=False)
    with pytest.raises(BackendError, match="credit limit"):
        account_backend(account, tmp_path / "b").finetune(MODEL, examples(), FinetuneConfig(),
                                                          key="k")
    assert not creates(account)


def test_failed_job_reports_its_error_event(tmp_path):
    with pytest.raises(FinetuneFailed, match="CUDA out of memory"):
        account_backend(Account(final="error"), tmp_path).finetune(
            MODEL, examples(), FinetuneConfig(), key="k")


def test_dry_run_prints_a_dollar_estimate_offline(shared, tmp_path):
    """Must show: the estimate comes from the table with the network unreachable (the SDK
    pointed at a refused port, as an offline machine would find api.together.ai)."""
    env = {**os.environ, "TOGETHER_BASE_URL": "http://127.0.0.1:9",
           "TOGETHER_API_KEY": "tg-dry-run-key-0123"}
    result = subprocess.run(
        [sys.executable, "-m", "semievol", "run", "--backend", "together", "--model", MODEL,
         "--data", str(shared / "data" / "fpb"), "--limit-unlabeled", "100", "--limit-test",
         "50", "--dry-run"],  # (the full task's estimate: test_openai_backend)
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    total = next(line for line in result.stdout.splitlines() if line.startswith("total"))
    assert "$" in total and float(total.split("$")[1].replace(",", "")) > 0
    assert "Together list prices as of 2026-11" in result.stdout
    assert "not reached" in result.stdout and "tg-dry-run-key" not in result.stdout
    assert not (tmp_path / "runs").exists()


def test_dry_run_asks_the_estimate_endpoint_when_reachable(server, tmp_path):
    from semievol.backends.together import ask_price
    from semievol.config import RunConfig
    from semievol.data import load_task
    from semievol.demo import make_task

    data = make_task(tmp_path / "data")
    config = RunConfig(data=str(data), backend="together", model="fake-base")
    line = ask_price(load_task(data), config, base_url=server.url, api_key=API_KEY)
    assert "Together's own estimate for the warm-up fine-tune: $0.0000" in line
    assert "trained tokens" in line


def test_429_and_5xx_are_retried_as_retry_after_says(tmp_path):
    """Every endpoint's first try is rate-limited (Retry-After), its second a 503: the SDK's
    own retries carry the whole fine-tune through, and one job is made."""
    account = Account()
    account.transport.fault = lambda method, path, nth: (
        Fault(429, {"retry-after": "0.05"}) if nth == 1
        else Fault(503, {"retry-after-ms": "20"}) if nth == 2 else None)
    model = account_backend(account, tmp_path, max_retries=2).finetune(
        MODEL, examples(), FinetuneConfig(batch_size=8), key="k")
    assert model == "u/Meta-Llama-3.1-8B-Instruct-Reference-x" and len(creates(account)) == 1
    statuses = [got for method, path, got in account.transport.requests
                if (method, path) == ("POST", "/v1/fine-tunes")]
    assert statuses == [429, 503, 200]


def test_a_lost_answer_to_the_create_is_found_not_made_again(tmp_path):
    """Together takes no idempotency key, so the SDK's own retry of a create whose answer
    was lost would make (and bill) a second job: the create is not retried blindly; the
    job is looked for by its suffix first, and found."""
    account = Account()
    account.transport.fault = lambda method, path, nth: (
        Fault(drop=True, after=True) if (method, path, nth) == ("POST", "/v1/fine-tunes", 1)
        else None)
    model = account_backend(account, tmp_path, max_retries=2).finetune(
        MODEL, examples(), FinetuneConfig(batch_size=8), key="k")
    assert model == "u/Meta-Llama-3.1-8B-Instruct-Reference-x" and len(creates(account)) == 1


def test_a_lost_answer_to_the_create_never_pays_twice(tmp_path):
    """Together makes the job, but the connection drops before the answer arrives: the run
    stops saying to run again, and the rerun finds the job by its suffix, making no second."""
    account = Account()
    account.transport.fault = lambda method, path, nth: (
        Fault(drop=True, after=True) if (method, path) == ("POST", "/v1/fine-tunes") else None)
    with pytest.raises(BackendError, match="creating the fine-tuning job: could not reach"):
        account_backend(account, tmp_path).finetune(MODEL, examples(),
                                                    FinetuneConfig(batch_size=8), key="k")
    assert len(creates(account)) == 1
    account.transport.fault = None
    model = account_backend(account, tmp_path).finetune(MODEL, examples(),
                                                        FinetuneConfig(batch_size=8), key="k")
    assert model == "u/Meta-Llama-3.1-8B-Instruct-Reference-x" and len(creates(account)) == 1


def test_a_stalled_account_is_a_timeout_that_says_so(tmp_path):
    account = Account()
    account.transport.fault = lambda method, path, nth: Fault(delay=60)
    with pytest.raises(BackendError, match="did not answer within 0.3 s"):
        account_backend(account, tmp_path, timeout=0.3).finetune(MODEL, examples(),
                                                                 FinetuneConfig(), key="k")
