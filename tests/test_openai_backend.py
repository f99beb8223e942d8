"""The OpenAI backend through the real SDK against a small in-memory imitation of the OpenAI
API (files, fine-tuning jobs, chat completions, embeddings, batches) behind the one
fault-injecting transport (``transport.py``), which can make it misbehave: answer 429 with
Retry-After or 500 to chosen requests, stall past the timeout, or refuse the key; the
imitation can also never finish a job. The cost arithmetic and the training-data validation
are pinned here too."""
from __future__ import annotations

import email.parser
import itertools
import json
import logging
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2
import numpy as np
import pytest
from transport import Fault, Transport, serve

from semievol import cost
from semievol.backends import load_backend
from semievol.backends.openai import OpenAIBackend, validate_training_data
from semievol.config import FinetuneConfig
from semievol.estimate import CountingBackend, Step, estimate_run, estimate_task, print_estimate
from semievol.errors import (BackendError, BudgetExceeded, ConfigError, DataError,
                             FinetuneFailed)

MODEL = "gpt-4o-mini-2024-07-18"
SECRET = "sk-test-DO-NOT-LEAK-4242"


# -- an imitation of the OpenAI API ---------------------------------------------------

class FakeOpenAI:
    """Just enough of the OpenAI API, in memory, as a world for :class:`transport.Transport`
    (``self.transport``, reached at ``self.url``; faults go in ``self.transport.fault``,
    on routes with ids as ``{file}``, ``{ftjob}``, ``{batch}``). ``job_polls`` is how many
    retrieves a job takes to finish (None: never); ``job_outcome`` "succeeded" or "failed";
    ``batch_failures`` custom_ids the first batch fails; ``api_key`` the only key it
    takes (None: any)."""

    url = "http://openai.test/v1"

    def __init__(self, *, job_polls: int | None = 2, job_outcome: str = "succeeded",
                 batch_failures=(), api_key: str | None = None):
        self.job_polls, self.job_outcome = job_polls, job_outcome
        self.batch_failures = set(batch_failures)
        self.api_key = api_key
        self.files: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.transport = Transport(self, httpx2, route=route)

    # what tests look at
    def bodies(self, method: str, path: str) -> list:
        return [r["body"] for r in self.requests
                if r["method"] == method and r["path"] == path and r["status"] == 200]

    def created_jobs(self) -> list[dict]:
        return list(self.jobs.values())

    # the API
    def __call__(self, request: httpx2.Request):
        method, path, headers, raw = (request.method, request.url.path, request.headers,
                                      request.content)
        query = {k: request.url.params.get_list(k) for k in request.url.params}
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            given = headers.get("authorization", "")[7:]
            return 401, {"error": {"message": f"Incorrect API key provided: {given}",
                                   "type": "invalid_request_error", "code": "invalid_api_key"}}
        body = json.loads(raw) if raw and "json" in headers.get("content-type", "") else None
        with self.lock:
            self.requests.append({"method": method, "path": route(path), "headers": headers,
                                  "body": body, "status": 200})
            return self.answer(method, route(path), path, query, headers, raw, body)

    def answer(self, method, route, path, query, headers, raw, body):
        if (method, route) == ("POST", "/v1/files"):
            fields = _multipart(headers["content-type"], raw)
            fid = f"file-{next(self.ids)}"
            self.files[fid] = {"id": fid, "object": "file", "bytes": len(fields["file"]),
                               "created_at": 0, "filename": "upload.jsonl",
                               "purpose": fields["purpose"].decode(), "status": "processed",
                               "data": fields["file"]}
            self.requests[-1]["body"] = {"purpose": fields["purpose"].decode(),
                                         "file": fields["file"].decode()}
            return {k: v for k, v in self.files[fid].items() if k != "data"}
        if (method, route) == ("GET", "/v1/files/{file}/content"):
            return self.files[path.split("/")[3]]["data"]
        if (method, route) == ("POST", "/v1/fine_tuning/jobs"):
            key = self.requests[-1]["headers"].get("idempotency-key")
            if (again := [j for j in self.jobs.values() if j["idempotency_key"] == key]):
                return self.job(again[0]["id"])       # as OpenAI honours Idempotency-Key
            jid = f"ftjob-{next(self.ids)}"
            self.jobs[jid] = {"id": jid, "object": "fine_tuning.job", "created_at": len(self.jobs),
                              "model": body["model"], "training_file": body["training_file"],
                              "status": "validating_files", "fine_tuned_model": None,
                              "metadata": body.get("metadata"), "seed": body.get("seed", 0),
                              "hyperparameters": {}, "organization_id": "org", "result_files": [],
                              "trained_tokens": None, "error": None, "polls": 0,
                              "idempotency_key": key}
            return self.job(jid)
        if (method, route) == ("GET", "/v1/fine_tuning/jobs"):
            wanted = {k[9:-1]: v[0] for k, v in query.items() if k.startswith("metadata[")}
            data = [self.job(j) for j, job in self.jobs.items()
                    if all((job["metadata"] or {}).get(k) == v for k, v in wanted.items())]
            return {"object": "list", "data": data[::-1], "has_more": False}
        if (method, route) == ("GET", "/v1/fine_tuning/jobs/{ftjob}"):
            job = self.jobs[path.split("/")[-1]]
            job["polls"] += 1
            if self.job_polls is not None and job["polls"] >= self.job_polls \
                    and job["status"] not in ("succeeded", "failed"):
                job["status"] = self.job_outcome
                if self.job_outcome == "succeeded":
                    job["fine_tuned_model"] = f"ft:{job['model'].split(':')[-1]}:org::{job['id']}"
                    job["trained_tokens"] = 1000
                else:
                    job["error"] = {"code": "invalid_training_file",
                                    "message": "the file has a bad line", "param": None}
            elif job["status"] == "validating_files":
                job["status"] = "running"
            return self.job(job["id"])
        if (method, route) == ("GET", "/v1/fine_tuning/jobs/{ftjob}/events"):
            job = self.jobs[path.split("/")[-2]]
            return {"object": "list", "has_more": False, "data": [
                {"id": f"ev-{job['id']}-{job['polls']}", "object": "fine_tuning.job.event",
                 "created_at": 0, "level": "info", "message": f"step {job['polls']}"}]}
        if (method, route) == ("POST", "/v1/chat/completions"):
            return self.completion(body)
        if (method, route) == ("POST", "/v1/embeddings"):
            data = [{"object": "embedding", "index": i,
                     "embedding": [float(len(t)), 1.0, float(i % 3)]}
                    for i, t in enumerate(body["input"])]
            return {"object": "list", "model": body["model"], "data": data,
                    "usage": {"prompt_tokens": len(data), "total_tokens": len(data)}}
        if (method, route) == ("POST", "/v1/batches"):
            bid = f"batch-{next(self.ids)}"
            fail = self.batch_failures if not self.batches else set()
            lines = [json.loads(line) for line in
                     self.files[body["input_file_id"]]["data"].decode().splitlines()]
            out = [{"id": f"r-{x['custom_id']}", "custom_id": x["custom_id"], "error": None,
                    "response": {"status_code": 200, "request_id": "q",
                                 "body": self.completion(x["body"])}}
                   for x in lines if x["custom_id"] not in fail]
            errors = [{"id": f"r-{x['custom_id']}", "custom_id": x["custom_id"], "response": None,
                       "error": {"code": "server_error", "message": "boom"}}
                      for x in lines if x["custom_id"] in fail]
            self.batches[bid] = {
                "id": bid, "object": "batch", "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"], "completion_window": "24h",
                "status": "in_progress", "created_at": 0, "metadata": body.get("metadata"),
                "output_file_id": self.store(out), "error_file_id": self.store(errors),
                "request_counts": {"total": len(lines), "completed": len(out),
                                   "failed": len(errors)}}
            return self.batches[bid]
        if (method, route) == ("GET", "/v1/batches/{batch}"):
            batch = self.batches[path.split("/")[-1]]
            batch["status"] = "completed"
            return batch
        raise AssertionError(f"unexpected {method} {path}")

    def job(self, jid):
        return {k: v for k, v in self.jobs[jid].items() if k not in ("polls", "idempotency_key")}

    def store(self, rows) -> str:
        fid = f"file-{next(self.ids)}"
        self.files[fid] = {"data": "".join(json.dumps(r) + "\n" for r in rows).encode()}
        return fid

    @staticmethod
    def completion(body):
        prompt = body["messages"][-1]["content"]
        choices = []
        for i in range(body.get("n", 1)):
            tokens = ["pos", "itive"] if i % 2 == 0 else ["neg", "ative"]
            choices.append({"index": i, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "".join(tokens)},
                            "logprobs": {"content": [
                                {"token": t, "logprob": -0.1 * (j + 1), "bytes": None,
                                 "top_logprobs": []} for j, t in enumerate(tokens)]}})
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
                "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": len(prompt.split()) + 10,
                          "completion_tokens": 2 * len(choices),
                          "total_tokens": len(prompt.split()) + 10 + 2 * len(choices),
                          "prompt_tokens_details": {"cached_tokens": 0}}}


def _multipart(content_type: str, raw: bytes) -> dict[str, bytes]:
    message = email.parser.BytesParser().parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.get_payload()}


def route(path: str) -> str:
    """A path with its ids as placeholders (``/v1/files/{file}/content``)."""
    return re.sub(r"/(file|ftjob|batch)-[\w-]+", r"/{\1}", path)


@pytest.fixture
def api():
    """A fresh FakeOpenAI."""
    return FakeOpenAI()


def make(api, workdir, **options) -> OpenAIBackend:
    """The backend on ``api`` (a FakeOpenAI, through its transport) or on a URL."""
    where = {"base_url": api} if isinstance(api, str) else \
        {"base_url": api.url, "http_client": api.transport.client()}
    options = {"api_key": SECRET, "poll_interval": 0.01, "max_retries": 3, "timeout": 5.0,
               "quiet": True, **where, **options}
    return OpenAIBackend(MODEL, workdir=workdir, **options)


def examples(count=12):
    return [[{"role": "system", "content": "Classify the sentiment."},
             {"role": "user", "content": f"Sales rose {i}% this quarter."},
             {"role": "assistant", "content": "positive"}] for i in range(count)]


# -- cost -----------------------------------------------------------------------------

def test_cost_arithmetic_is_pinned_on_a_small_input():
    prompts = [[{"role": "user", "content": "hello"}]] * 3   # 8 tokens each
    assert cost.count_chat_tokens(prompts[0], MODEL) == 8
    counting = CountingBackend(_task(), MODEL, embed_model="e", style="text")
    out = counting.generate_with_logprobs(MODEL, prompts, n=4, temperature=1.0, max_tokens=10)
    assert out.usage.prompt_tokens == 24          # the prompt is billed once, not n times
    train = counting.finetune(MODEL, [[{"role": "user", "content": "hello"},
                                       {"role": "assistant", "content": "hello"}]],
                              FinetuneConfig(epochs=2), key="k")
    assert train.usage.trained_tokens == 2 * (3 + 2 * (3 + 1 + 1))
    assert cost.base_of(train) == MODEL           # priced as a fine-tuned MODEL
    est = estimate_run([
        Step("train", MODEL, trained_tokens=1_000_000),                       # $3.00
        Step("chat", "ft:gpt-4o-mini-2024-07-18:org::x",                     # 0.30 + 1.20
             input_tokens=1_000_000, output_tokens=1_000_000),
        Step("batch", MODEL, input_tokens=2_000_000, output_tokens=1_000_000,
             batch=True),                                                   # (0.30 + 0.60) / 2
        Step("embed", "text-embedding-3-small", input_tokens=1_000_000),    # 0.02
    ])
    assert [round(usd, 6) for _, usd in est.steps] == [3.0, 1.5, 0.45, 0.02]
    assert est.total_usd == pytest.approx(4.97)
    assert "total" in est.format() and "$4.9700" in est.format()
    assert est.to_dict()["steps"][0]["usd"] == pytest.approx(3.0)


def test_cached_tokens_overrides_and_unknown_models():
    assert cost.chat_cost(MODEL, 1000, 0, cached_tokens=400) == pytest.approx(
        (600 * 0.15 + 400 * 0.075) / 1e6)
    assert cost.price_of("gpt-4o-2024-08-06").input == 2.50         # not gpt-4o-mini's
    assert cost.price_of("smollm2-135m") is None
    est = estimate_run([Step("x", "smollm2-135m", input_tokens=5)])
    assert est.total_usd is None and "n/a" in est.format()
    est = estimate_run([Step("x", "smollm2-135m", input_tokens=10**6)],
                       prices={"smollm2-135m": {"input": 1.0}})
    assert est.total_usd == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        cost.price_table({"m": {"inptu": 1.0}})


def _task():
    from semievol.types import Example, Task

    opts = ("positive", "negative", "neutral")
    labeled = [Example(f"l{i}", f"Profit rose {i}%.", opts, "A") for i in range(2)]
    unlabeled = [Example(f"u{i}", f"Costs fell {i}%.", opts) for i in range(4)]
    test = [Example(f"t{i}", f"Sales were flat {i}.", opts, "C") for i in range(3)]
    return Task("tiny", labeled, unlabeled, test)


def test_estimate_task_follows_the_pipeline_steps():
    from semievol import prompts
    from semievol.config import RunConfig

    task = _task()
    config = RunConfig(data="x", backend="openai", n=4, k=1, theta=0.5, max_tokens=8)
    est = estimate_task(task, config, model=MODEL, embed_model="text-embedding-3-small")
    steps = {s.name: s for s, _ in est.steps}
    assert list(steps) == ["warm-up fine-tune", "r1 embed questions", "r1 collaborate",
                           "r1 evolve fine-tune", "eval vanilla", "eval sft", "eval semievol"]
    warm = [prompts.training_example(e, "A") for e in task.labeled]
    assert steps["warm-up fine-tune"].trained_tokens == 2 * sum(
        cost.count_chat_tokens(ex, MODEL) for ex in warm)
    collab = steps["r1 collaborate"]
    assert collab.model == f"ft:{MODEL}"
    asked = sum(cost.count_chat_tokens(prompts.question_prompt(ex, "text", [task.labeled[0]]),
                                       MODEL) for ex in task.unlabeled)
    assert collab.input_tokens > asked         # the questions, then every one to self-justify
    assert 0 < collab.output_tokens <= 4 * 5 * 8
    assert steps["r1 evolve fine-tune"].trained_tokens > 0
    assert steps["eval semievol"].output_tokens <= 3 * 8
    assert est.total_usd == pytest.approx(sum(usd for _, usd in est.steps))
    # without IWP there is no warm-up and no SFT evaluation; with batch, half price
    plain = estimate_task(task, config.replace(iwp=False, icp=False), model=MODEL,
                          embed_model="text-embedding-3-small", batch=True)
    names = [s.name for s, _ in plain.steps]
    assert "warm-up fine-tune" not in names and "eval sft" not in names
    assert "r1 embed questions" not in names and all(s.batch for s, _ in plain.steps
                                                     if s.name.startswith("eval"))


def test_dry_run_estimate_on_the_full_fpb_task(shared, capsys):
    from semievol.config import RunConfig
    from semievol.data import load_task

    task = load_task(shared / "data" / "fpb")
    est = print_estimate(task, RunConfig(data=str(shared / "data" / "fpb"), backend="openai"),
                         model=MODEL, embed_model="text-embedding-3-small")
    out = capsys.readouterr().out
    assert MODEL in out and "total" in out
    assert 0.1 < est.total_usd < 10


def test_budget_guard():
    from semievol.types import Usage

    usage = Usage(cost_usd=0.8)
    budget = cost.Budget(1.0, usage)
    budget.check("small step", 0.1)
    budget.check("unpriced step", None)
    with pytest.raises(BudgetExceeded, match="passes the limit of \\$1.0000"):
        budget.check("big step", 0.3)
    cost.Budget(None, usage).check("anything", 1e9)


# -- validation -----------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    ([{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role"),
    ([{"role": "user", "content": "x"}], "no assistant message"),
    ([{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}],
     "not a string"),
    ([{"role": "user"}, {"role": "assistant", "content": "y"}], "lacks"),
    ([{"role": "user", "content": "x", "extra": 1}, {"role": "assistant", "content": "y"}],
     "unknown keys"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}],
     "weight"),
    ([], "non-empty list"),
])
def test_validation_rejects_bad_examples(bad, message):
    with pytest.raises(DataError, match=message):
        validate_training_data(examples(11) + [bad], MODEL)


def test_validation_counts_tokens_and_limits():
    stats = validate_training_data(examples(10), MODEL)
    assert stats.n_examples == 10
    assert stats.total_tokens == sum(cost.count_chat_tokens(ex, MODEL) for ex in examples(10))
    with pytest.raises(DataError, match="at least 10"):
        validate_training_data(examples(9), MODEL)
    long = [{"role": "user", "content": "hello " * 17000}, {"role": "assistant", "content": "y"}]
    validate_training_data(examples(10) + [long], MODEL)           # 65,536 allowed
    with pytest.raises(DataError, match="over the 16,385"):
        validate_training_data(examples(10) + [long], "gpt-3.5-turbo-0125")


# -- fine-tuning ----------------------------------------------------------------------

def test_finetune_uploads_creates_polls_and_records(api, tmp_path):
    fake = api
    backend = make(fake, tmp_path)
    model = backend.finetune(MODEL, examples(), FinetuneConfig(seed=7), key="run1/warm-up")
    assert model.startswith("ft:gpt-4o-mini-2024-07-18:org::ftjob-")
    (upload,) = fake.bodies("POST", "/v1/files")
    assert upload["purpose"] == "fine-tune"
    lines = [json.loads(line) for line in upload["file"].splitlines()]
    assert lines[0]["messages"] == examples()[0] and len(lines) == 12
    (create,) = fake.bodies("POST", "/v1/fine_tuning/jobs")
    assert create["method"] == {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 2, "batch_size": 8}}}
    assert create["seed"] == 7 and create["suffix"].startswith("semievol-run1-warm-up")
    assert create["metadata"]["semievol_key"] == "run1/warm-up"
    assert fake.created_jobs()[0]["idempotency_key"].startswith("semievol-")
    (record_file,) = (tmp_path / "jobs").glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["job_id"] == fake.created_jobs()[0]["id"]
    assert record["fine_tuned_model"] == model and record["status"] == "succeeded"
    assert model.usage.trained_tokens == 1000
    assert model.usage.cost_usd == pytest.approx(1000 * 3.0 / 1e6)


def test_finetune_continues_from_an_ft_model_with_lr_multiplier(api, tmp_path):
    fake = api
    warm = "ft:gpt-4o-mini-2024-07-18:org::ftjob-0"
    config = FinetuneConfig(learning_rate_multiplier=0.5, batch_size=4)
    make(fake, tmp_path).finetune(warm, examples(), config, key="evolve")
    (create,) = fake.bodies("POST", "/v1/fine_tuning/jobs")
    assert create["model"] == warm
    assert create["method"]["supervised"]["hyperparameters"] == {
        "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}


def test_same_key_never_pays_twice(api, tmp_path):
    fake = api
    first = make(fake, tmp_path / "a").finetune(MODEL, examples(), FinetuneConfig(), key="k")
    # the workdir record finds it
    again = make(fake, tmp_path / "a").finetune(MODEL, examples(), FinetuneConfig(), key="k")
    # a fresh workdir: the job list, filtered by metadata, finds it
    elsewhere = make(fake, tmp_path / "b").finetune(MODEL, examples(), FinetuneConfig(), key="k")
    assert first == again == elsewhere
    assert len(fake.created_jobs()) == 1 and len(fake.bodies("POST", "/v1/files")) == 1
    # another key is another job
    make(fake, tmp_path / "a").finetune(MODEL, examples(), FinetuneConfig(), key="other")
    assert len(fake.created_jobs()) == 2


def test_killed_while_the_job_runs_then_resumed_creates_no_second_job(api, tmp_path):
    fake = api
    fake.job_polls = None                                   # the job runs until we say
    with pytest.raises(BackendError, match="still running.*run again to resume"):
        make(fake, tmp_path, max_wait=0.2).finetune(MODEL, examples(), FinetuneConfig(), key="k")
    record = json.loads(next((tmp_path / "jobs").glob("*.json")).read_text())
    assert record["job_id"] and record["file_id"]            # written the moment they exist
    fake.job_polls = 1
    model = make(fake, tmp_path).finetune(MODEL, examples(), FinetuneConfig(), key="k")
    assert model.startswith("ft:") and len(fake.created_jobs()) == 1


def test_a_process_killed_during_the_job_leaves_a_record_and_the_rerun_reuses_the_job(
        api, tmp_path):
    fake = api
    fake.job_polls = None
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import test_openai_backend as t; "
              "t.make(sys.argv[2], sys.argv[3]).finetune(t.MODEL, t.examples(), "
              "t.FinetuneConfig(), key='k')")
    with serve(fake.transport) as root:                  # the child reaches it over HTTP
        child = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent),
                                  root + "/v1", str(tmp_path)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not any(j["polls"] >= 2 for j in fake.jobs.values()):
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the job was never polled"
            time.sleep(0.02)
        child.kill()                                      # SIGKILL: no clean-up at all
        child.wait()
    fake.job_polls = 1
    model = make(fake, tmp_path).finetune(MODEL, examples(), FinetuneConfig(), key="k")
    assert model.startswith("ft:") and len(fake.created_jobs()) == 1


def test_failed_job_raises_its_error_and_a_rerun_tries_again(api, tmp_path):
    fake = api
    fake.job_outcome = "failed"
    with pytest.raises(FinetuneFailed, match="invalid_training_file: the file has a bad line"):
        make(fake, tmp_path).finetune(MODEL, examples(), FinetuneConfig(), key="k")
    fake.job_outcome = "succeeded"
    assert make(fake, tmp_path).finetune(MODEL, examples(), FinetuneConfig(), key="k")
    first, second = fake.created_jobs()
    assert first["idempotency_key"] != second["idempotency_key"]


def test_bad_data_and_budget_stop_before_any_upload(api, tmp_path):
    fake = api
    with pytest.raises(DataError):
        make(fake, tmp_path).finetune(MODEL, examples(3), FinetuneConfig(), key="k")
    with pytest.raises(BudgetExceeded, match="fine-tuning"):
        make(fake, tmp_path, max_cost_usd=1e-6).finetune(MODEL, examples(), FinetuneConfig(),
                                                        key="k")
    with pytest.raises(ConfigError, match="whole number of epochs"):
        make(fake, tmp_path).finetune(MODEL, examples(), FinetuneConfig(epochs=1.5), key="k")
    assert fake.bodies("POST", "/v1/files") == []


# -- generation and embeddings --------------------------------------------------------

def test_generate_asks_for_n_samples_in_one_request_per_prompt(api, tmp_path):
    fake = api
    backend = make(fake, tmp_path)
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    out = backend.generate_with_logprobs(MODEL, prompts, n=4, temperature=1.0, max_tokens=8,
                                         seed=3)
    bodies = fake.bodies("POST", "/v1/chat/completions")
    assert len(bodies) == 5 and len(out) == 5 and all(len(g) == 4 for g in out)
    assert {(b["n"], b["logprobs"], b["seed"], b["max_completion_tokens"]) for b in bodies} == {
        (4, True, 3, 8)}
    first = out[0][0]
    assert first.text == "positive" and first.tokens == ("pos", "itive")
    assert first.logprobs == pytest.approx((-0.1, -0.2)) and out[0][1].text == "negative"
    assert out.usage.prompt_tokens == 5 * 12 and out.usage.completion_tokens == 40
    assert out.usage.cost_usd == pytest.approx((60 * 0.15 + 40 * 0.60) / 1e6)


def test_generation_budget(api, tmp_path):
    fake = api
    backend = make(fake, tmp_path, max_cost_usd=0.0001)
    prompts = [[{"role": "user", "content": "hello"}]] * 10
    with pytest.raises(BudgetExceeded):
        backend.generate_with_logprobs(MODEL, prompts, n=4, max_tokens=1000)
    assert fake.bodies("POST", "/v1/chat/completions") == []
    backend.generate_with_logprobs(MODEL, prompts, n=1, max_tokens=8)


def test_batch_mode_resubmits_only_the_failed_requests(api, tmp_path):
    fake = api
    fake.batch_failures = {"r1", "r3"}
    backend = make(fake, tmp_path, batch_mode=True)
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    out = backend.generate_with_logprobs(MODEL, prompts, n=2, max_tokens=4)
    assert [len(g) for g in out] == [2] * 5 and out[4][1].text == "negative"
    first, second = [f for f in fake.bodies("POST", "/v1/files")]
    assert first["purpose"] == "batch"
    resubmitted = [json.loads(line)["custom_id"] for line in second["file"].splitlines()]
    assert resubmitted == ["r1", "r3"]
    assert {b["completion_window"] for b in fake.bodies("POST", "/v1/batches")} == {"24h"}
    record = json.loads(next((tmp_path / "batches").glob("*.json")).read_text())
    assert record["batch_ids"] == list(fake.batches)
    # the same call again reads the recorded batches and submits nothing new
    again = make(fake, tmp_path, batch_mode=True).generate_with_logprobs(
        MODEL, prompts, n=2, max_tokens=4)
    assert [[g.text for g in s] for s in again] == [[g.text for g in s] for s in out]
    assert len(fake.batches) == 2
    assert out.usage.cost_usd == pytest.approx(
        cost.chat_cost(MODEL, out.usage.prompt_tokens, out.usage.completion_tokens, batch=True))


def test_embed_batches_within_limits_and_normalises(api, tmp_path):
    fake = api
    texts = [f"text number {i}" for i in range(2100)]
    vectors = make(fake, tmp_path, embed_model="text-embedding-3-small").embed(texts)
    sizes = [len(b["input"]) for b in fake.bodies("POST", "/v1/embeddings")]
    assert sizes == [2048, 52]
    assert {(b["model"], b["encoding_format"]) for b in fake.bodies("POST", "/v1/embeddings")} \
        == {("text-embedding-3-small", "float")}
    assert vectors.shape == (2100, 3)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert make(fake, tmp_path).embed([]).shape[0] == 0


def test_embedding_model_is_openais_or_the_served_one():
    assert OpenAIBackend(api_key="sk-x").embed_model == "text-embedding-3-small"
    local = OpenAIBackend("smollm2-135m", base_url="http://127.0.0.1:8000/v1")
    assert local.embed_model == "smollm2-135m"     # semievol serve embeds with its model
    assert OpenAIBackend("m", base_url="http://127.0.0.1:8000/v1",
                         embed_model="e").embed_model == "e"


def test_embedding_batches_respect_the_token_limit():
    from semievol.backends.hosted import request_batches
    from semievol.backends.openai import EMBED_MAX_INPUTS, EMBED_MAX_TOKENS

    def batches(counts):
        return list(request_batches(counts, max_inputs=EMBED_MAX_INPUTS,
                                    max_tokens=EMBED_MAX_TOKENS))

    assert batches([100_000] * 5) == [(0, 2), (2, 4), (4, 5)]
    assert batches([1] * 4097) == [(0, 2048), (2048, 4096), (4096, 4097)]


# -- faults ---------------------------------------------------------------------------

def _whole_run(fake, workdir, **options):
    backend = make(fake, workdir, **options)
    model = backend.finetune(MODEL, examples(), FinetuneConfig(), key="k")
    out = backend.generate_with_logprobs(model, [[{"role": "user", "content": "q"}]] * 3, n=2)
    backend.embed(["a", "b"])
    return model, out


def test_run_survives_429_with_retry_after_and_500(api, tmp_path):
    fake = api

    def fault(method, route, nth):       # the first two tries of every endpoint fail
        if nth == 1:
            return Fault(429, {"retry-after": "0.05"})
        if nth == 2:
            return Fault(500, {"retry-after-ms": "20"})

    fake.transport.fault = fault
    model, out = _whole_run(fake, tmp_path)
    assert model.startswith("ft:") and len(out) == 3
    assert len(fake.created_jobs()) == 1          # retried creates did not make a second job


def test_retry_after_is_honoured(api, tmp_path):
    fake = api
    fake.transport.fault = lambda method, route, nth: (Fault(429, {"retry-after": "1"})
                                                       if nth == 1 else None)
    start = time.monotonic()
    make(fake, tmp_path).embed(["a"])
    assert time.monotonic() - start >= 1.0


def test_a_server_that_always_fails_stops_clearly_and_the_run_resumes(api, tmp_path):
    fake = api
    fake.transport.fault = lambda method, route, nth: (
        Fault(500, {"retry-after-ms": "10"}) if route.startswith("/v1/fine_tuning/jobs/")
        else None)
    with pytest.raises(BackendError, match="HTTP 500.*run again to resume"):
        _whole_run(fake, tmp_path)
    assert len(fake.created_jobs()) == 1          # created, then polling failed
    fake.transport.fault = None
    model, _ = _whole_run(fake, tmp_path)
    assert model.startswith("ft:") and len(fake.created_jobs()) == 1


def test_unreachable_server_and_timeouts(tmp_path, api):
    with pytest.raises(BackendError, match="could not reach http://127.0.0.1:9/v1"):
        make("http://127.0.0.1:9/v1", tmp_path, max_retries=0).embed(["a"])
    fake = api
    fake.transport.fault = lambda method, route, nth: Fault(delay=1.0)    # a stalled server
    with pytest.raises(BackendError, match="did not answer within 0.3"):
        make(fake, tmp_path, timeout=0.3, max_retries=0).embed(["a"])
    fake.transport.fault = lambda method, route, nth: Fault(delay=0.2)    # a slow one
    assert make(fake, tmp_path, timeout=0.3, max_retries=0).embed(["a"]).shape == (1, 3)
    fake.transport.fault = lambda method, route, nth: Fault(drop=True)    # a dropped connection
    with pytest.raises(BackendError, match="could not reach http://openai.test/v1.*resume"):
        make(fake, tmp_path, max_retries=1).embed(["a"])
    assert [got for _, _, got in fake.transport.requests[-2:]] == ["dropped", "dropped"]


def test_a_lost_answer_to_the_create_is_retried_under_the_same_idempotency_key(api, tmp_path):
    """The API creates the job but the connection drops before its answer arrives: the SDK
    retries with the same Idempotency-Key, which the API honours, so there is one job."""
    fake = api
    fake.transport.fault = lambda method, route, nth: (
        Fault(drop=True, after=True) if (method, route, nth) == ("POST", "/v1/fine_tuning/jobs", 1)
        else None)
    model = make(fake, tmp_path).finetune(MODEL, examples(), FinetuneConfig(), key="lost")
    assert model.startswith("ft:") and len(fake.created_jobs()) == 1
    assert fake.transport.counts["POST", "/v1/fine_tuning/jobs"] == 2


# -- keys and secrets -----------------------------------------------------------------

def test_api_key_from_env_flag_or_local_placeholder(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        OpenAIBackend()
    assert OpenAIBackend(base_url="http://127.0.0.1:8000/v1").client.api_key == "semievol-local"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    assert OpenAIBackend().client.api_key == "sk-from-env"
    backend = load_backend("openai", model="gpt-4.1-mini", api_key="sk-flag", workdir=tmp_path)
    assert backend.client.api_key == "sk-flag" and backend.default_model == "gpt-4.1-mini"
    assert "sk-flag" not in repr(backend)


def test_the_key_reaches_no_file_log_or_message(api, tmp_path, caplog, capsys):
    fake = api
    caplog.set_level(logging.DEBUG)
    _whole_run(fake, tmp_path, quiet=False)
    fake.api_key = "sk-the-right-one"                     # now the server refuses ours
    with pytest.raises(BackendError, match="refused the API key") as refused:
        make(fake, tmp_path).embed(["a"])
    assert SECRET not in str(refused.value) and "***" in str(refused.value)
    written = "".join(p.read_text() for p in tmp_path.rglob("*") if p.is_file())
    assert written and SECRET not in written
    out, err = capsys.readouterr()
    assert "fine-tuning job" in err                       # progress was shown ...
    assert SECRET not in out + err + caplog.text          # ... without the key


def test_estimate_sends_no_self_justify_prompts_when_disagreements_are_voted():
    from semievol.config import RunConfig

    config = RunConfig(data="x", backend="openai", n=4, k=1, max_tokens=8, justify="vote")
    voted = estimate_task(_task(), config, model=MODEL, embed_model="e")
    asked = estimate_task(_task(), config.replace(justify="model"), model=MODEL, embed_model="e")
    tokens = [{s.name: s.input_tokens for s, _ in est.steps}["r1 collaborate"]
              for est in (voted, asked)]
    assert tokens[0] < tokens[1]               # no self-justify prompts when the vote settles


# -- a whole run under a budget -------------------------------------------------------

def test_a_run_stopped_by_its_budget_resumes_once_the_limit_is_raised(api, tmp_path):
    """The budget stops the run part-way through mining, before the call that would pass
    it; the same run with a higher --max-cost-usd resumes (the budget may change on resume,
    nothing else may), mines only what is left and counts what the first part spent."""
    from semievol import RunConfig
    from semievol.demo import make_task
    from semievol.pipeline import run

    fake = api
    prices = {"ft:gpt-4o-mini": {"input": 100.0, "output": 100.0}}  # mining is what costs
    config = RunConfig.recipe("paper", data=str(make_task(tmp_path / "data")), backend="openai",
                              model=MODEL, limit_unlabeled=16, limit_test=8, generation_batch=4,
                              max_cost_usd=0.25)
    out = tmp_path / "run"
    with pytest.raises(BudgetExceeded, match="raise the limit and rerun"):
        run(config, make(fake, out / "backend", max_cost_usd=0.25, prices=prices), out, quiet=True)
    mined = (out / "collaborate_r1.jsonl").read_text().splitlines()
    assert 0 < len(mined) < 16 and not (out / "results.json").exists()
    spent = json.loads((out / "manifest.json").read_text())["usage"]["cost_usd"]
    assert 0.05 < spent <= 0.25
    jobs, asked = len(fake.created_jobs()), len(fake.bodies("POST", "/v1/chat/completions"))

    raised = config.replace(max_cost_usd=5.0)
    results = run(raised, make(fake, out / "backend", max_cost_usd=5.0, prices=prices), out,
                  quiet=True)
    assert len(fake.created_jobs()) == jobs                 # the warm-up was not trained again
    again = fake.bodies("POST", "/v1/chat/completions")[asked:]
    mining = [b for b in again if b.get("n") == 4]
    assert len(mining) == 16 - len(mined)                   # only the rest was mined
    assert results["usage"]["cost_usd"] > spent and results["config"]["max_cost_usd"] == 5.0
    with pytest.raises(ConfigError, match="theta"):
        run(raised.replace(theta=0.3), make(fake, out / "backend"), out, quiet=True)


# -- OpenAI closing fine-tuning -----------------------------------------------------------

@pytest.mark.parametrize("status, error", [
    (403, {"message": "You are not allowed to create fine-tuning jobs.",
           "type": "invalid_request_error", "code": None}),
    (403, {"message": "Forbidden", "type": "permission_error", "code": "forbidden"}),
    (400, {"message": "Fine-tuning is no longer available to this organization.",
           "type": "invalid_request_error", "code": None}),
    (400, {"message": "This organization does not have access to fine-tuning.",
           "type": "invalid_request_error", "code": "fine_tuning_not_available"}),
    (404, {"message": "Fine-tuning jobs are not enabled for your organization.",
           "type": "invalid_request_error", "code": None}),
])
def test_lost_fine_tuning_access_names_the_other_backends(api, tmp_path, status, error):
    fake = api
    fake.transport.fault = lambda method, route, nth: (
        Fault(status, error=error) if (method, route) == ("POST", "/v1/fine_tuning/jobs")
        else None)
    with pytest.raises(BackendError) as e:
        make(fake, tmp_path).finetune(MODEL, examples(), FinetuneConfig(), key="closed")
    message = str(e.value)
    assert "no fine-tuning access" in message and f"HTTP {status}" in message
    assert "--backend together" in message and "--backend hf" in message
    assert "2027-01-06" in message and "2027-01-14" in message and SECRET not in message
    assert not fake.created_jobs()


def test_the_serving_end_is_asked_of_openai_and_said_before_training(tmp_path, capsys):
    """On api.openai.com the models endpoint's ``shutdown_date`` wins over the built-in
    date; the note names both dates before anything is uploaded."""
    from semievol.backends.openai import shutdown_date

    def answer(request: httpx2.Request):
        if request.url.path.startswith("/v1/models/"):
            return {"id": MODEL, "object": "model", "created": 0, "owned_by": "system",
                    "shutdown_date": "2027-01-15"}
        if request.url.path == "/v1/fine_tuning/jobs":
            return {"object": "list", "data": [], "has_more": False}
        return 503, {"error": {"message": "down"}}

    openai_com = Transport(answer, httpx2)
    backend = OpenAIBackend(MODEL, api_key=SECRET, workdir=tmp_path, max_retries=0,
                            http_client=openai_com.client())
    assert backend.base_url.startswith("https://api.openai.com")
    assert shutdown_date(backend, MODEL) == "2027-01-15"
    with pytest.raises(BackendError):  # the upload meets the 503
        backend.finetune(MODEL, examples(), FinetuneConfig(), key="dated")
    said = capsys.readouterr().err
    assert f"stops serving {MODEL}" in said and "2027-01-15" in said and "2027-01-06" in said
    asked = [path for _, path, _ in openai_com.requests]
    assert asked.index(f"/v1/models/{MODEL}") < asked.index("/v1/files")
    local = make("http://127.0.0.1:9/v1", tmp_path)  # elsewhere nothing is asked
    assert shutdown_date(local, MODEL) == "2027-01-14"
    assert shutdown_date(local, "gpt-5.6-terra") is None


@pytest.mark.parametrize("method, route, status, error, expected", [
    # a 400 about the request itself is not lost access
    ("POST", "/v1/fine_tuning/jobs", 400,
     {"message": "Invalid training file for fine-tuning: line 3 has no assistant message.",
      "type": "invalid_request_error", "code": "invalid_training_file"}, "HTTP 400"),
    # a 403 anywhere else is the key's
    ("POST", "/v1/files", 403, {"message": "Forbidden", "type": "permission_error"},
     "refused the API key"),
])
def test_other_refusals_are_not_taken_for_the_shutdown(api, tmp_path, method, route, status,
                                                        error, expected):
    fake = api
    fake.transport.fault = lambda m, r, nth: (Fault(status, error=error)
                                              if (m, r) == (method, route) else None)
    with pytest.raises(BackendError, match=expected) as e:
        make(fake, tmp_path, max_retries=0).finetune(MODEL, examples(), FinetuneConfig(),
                                                    key="other")
    assert "--backend together" not in str(e.value)
