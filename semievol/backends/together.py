"""The Together backend: LoRA fine-tuning jobs on open models, chat completions with token
logprobs, embeddings — through the official ``together`` SDK (3.x), against api.together.ai
or any server that speaks its API (``semievol serve``, which speaks it on the same port as
OpenAI's).

What it promises beyond the Backend protocol:

* **Never pay twice.** Together jobs carry no metadata, so the idempotency ``key`` goes into
  the job's ``suffix`` as a short hash (``semievol-<16 hex>``, within Together's 40
  characters) and a record ``workdir/jobs/<slug>.json`` is written atomically the moment the
  file id and the job id exist. A rerun looks first at the record, then among the account's
  jobs for that suffix; a job that completed is reused, one still going is waited on, and
  only when neither exists is a job created.
* **Validated before upload** with Together's own rules and limits: the SDK's file check
  (the one ``together files check`` runs) on the exact bytes to be uploaded, the model's
  limits from ``/v1/fine-tunes/models/limits`` (sequence length per example, LoRA rank,
  batch size, learning rate, epochs) — see :func:`validate_training_data`.
* **Evolve continues the warm-up model**: a ``base`` that is the output of a job this
  backend made is trained further with ``from_checkpoint`` (its output model name), on the
  root model's limits and price.
* **Costs are known.** Each spending step is priced from :data:`semievol.cost.TOGETHER_PRICES`
  (a dated table, overridable with ``prices``) and, for fine-tuning, by Together's own
  ``/v1/fine-tunes/estimate-price`` once the file is uploaded; either is checked against
  ``max_cost_usd``; each call's result carries what the API reported it used (``.usage``),
  and their running total (``spending``) feeds the budget.
* **Faults.** The SDK retries connection errors, 408/409/429/5xx ``max_retries`` times; jobs
  are polled with tenacity, their events shown on a progress bar. What still fails is
  translated, in :meth:`TogetherBackend._api` only::

      together.APIConnectionError, APITimeoutError ─┐
      together.AuthenticationError, PermissionDenied├─> BackendError  (says what to do)
      together.RateLimitError, other APIStatusError ┘
      job status error / cancelled ──────────────────> FinetuneFailed
      invalid training data (the SDK's file check) ──> DataError
      a hyperparameter outside the model's limits ───> ConfigError
      a step that would pass max_cost_usd ───────────> BudgetExceeded

* **The API key** comes from the argument or ``TOGETHER_API_KEY`` and lives only inside the
  SDK client, never in the workdir, a log line or an error message. A server on loopback
  needs none (the placeholder ``"semievol-local"`` is sent).

``base_url`` is the API root: ``https://api.together.ai`` by default; a trailing ``/v1`` is
accepted and dropped (the SDK adds it to every path), so ``--base-url
http://127.0.0.1:8000/v1`` works as it does on the openai backend.

Uploads use the documented one-request ``POST /v1/files/upload`` (multipart). The SDK's
``files.upload`` helper instead goes through a presigned-URL redirect that the official API
description does not describe and that would not reach a local server.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import together
from together.lib.utils.files import check_file
from together.types import FileResponse
from tqdm.auto import tqdm

from .. import cost
from ..chatfile import example_problem
from ..errors import BackendError, ConfigError, DataError, FinetuneFailed
from ..rundir import digest, slug
from ..types import ChatExample, Embeddings, Generation, Generations, Message, ModelRef, Usage
from . import library_versions
from .hosted import (Records, Spending, TrainingStats, embed_in_batches, is_loopback,
                     jsonl, poll, say, scrub, sdk_errors, whole_epochs)

__all__ = ["TogetherBackend", "validate_training_data", "DEFAULT_MODEL",
           "DEFAULT_EMBED_MODEL"]

DEFAULT_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
"""The paper's own model, in the form Together fine-tunes."""
DEFAULT_EMBED_MODEL = "BAAI/bge-base-en-v1.5"
LOCAL_API_KEY = "semievol-local"

EMBED_MAX_INPUTS = 256
EMBED_MAX_TOKENS = 100_000
"""Per embeddings request. Together documents no batch limit; these keep each request well
inside what its serverless embedding models take."""

JOB_DONE = {"completed", "error", "cancelled", "user_error"}
JOB_FAILED = JOB_DONE - {"completed"}
SUFFIX_PREFIX = "semievol-"
ROLES = frozenset({"system", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "weight"})
"""Together's conversational training format (docs: fine-tuning data preparation)."""


class TogetherBackend:
    """The Backend protocol over the Together API (see the module docstring)."""

    name = "together"
    min_finetune_examples = 1
    """Together's own minimum (``together.lib.constants.MIN_SAMPLES``)."""

    def __init__(self, model: str | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, workdir: str | Path | None = None,
                 max_concurrency: int = 8, prices: dict | None = None,
                 max_cost_usd: float | None = None, spent_usd: float = 0.0,
                 embed_model: str | None = None,
                 timeout: float = 60.0, max_retries: int = 5, poll_interval: float = 5.0,
                 max_wait: float | None = None, quiet: bool = False, http_client=None):
        """
        ``workdir``: where job records are kept (None: only the API's job list protects
        against paying twice). ``embed_model``: None means ``BAAI/bge-base-en-v1.5``, or
        with a ``base_url`` the served model itself. ``prices``: overrides of
        :data:`semievol.cost.TOGETHER_PRICES`. ``timeout``: seconds per HTTP request;
        ``max_retries``: the SDK's retries. ``poll_interval``: first wait between job polls
        (backing off to 12x); ``max_wait``: stop waiting on a job after this many seconds
        (a rerun resumes waiting). ``http_client``: an ``httpx.Client`` for the SDK.
        """
        self.default_model = model or DEFAULT_MODEL
        self.embed_model = embed_model or (self.default_model if base_url
                                           else DEFAULT_EMBED_MODEL)
        self.records = Records(workdir)
        self.max_concurrency = max_concurrency
        self.prices = cost.price_table(prices, "together")
        self.poll_interval = poll_interval
        self.max_wait = max_wait
        self.quiet = quiet
        self.spending = Spending(max_cost_usd, spent_usd)
        self.budget = self.spending.budget
        self._limits: dict[str, object] = {}
        key = api_key or os.environ.get("TOGETHER_API_KEY")
        if not key:
            if not (base_url and is_loopback(base_url)):
                raise ConfigError("no Together API key: set TOGETHER_API_KEY "
                                  "(or pass --api-key)")
            key = LOCAL_API_KEY
        self._secret = key
        if base_url:
            base_url = re.sub(r"/v1/?$", "", base_url.rstrip("/"))
        self.client = together.Together(api_key=key, base_url=base_url, timeout=timeout,
                                        max_retries=max_retries, http_client=http_client)

    def __repr__(self) -> str:
        return f"TogetherBackend(model={self.default_model!r}, base_url={self.base_url!r})"

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    # -- fine-tuning --------------------------------------------------------------------
    def finetune(self, base: str, examples: Sequence[ChatExample], config, *,
                 key: str) -> ModelRef:
        """A LoRA job on ``base`` (a model, or a model this backend fine-tuned: then
        ``from_checkpoint``); returns the job's output model name. Reuses or resumes the job
        of ``key``."""
        epochs = whole_epochs(config.epochs, "Together")
        record = self.records.read("jobs", key) or {"key": key}
        job = self._find_job(record)
        if job is None:
            root, checkpoint = self._origin(base)
            limits = self._model_limits(root)
            data = jsonl({"messages": list(ex)} for ex in examples)
            stats = validate_training_data(examples, root, config, limits, data=data)
            trained = stats.total_tokens * epochs
            billed = f"ft:{root}" if checkpoint else root
            estimate = cost.training_cost(billed, trained, prices=self.prices)
            self._say(f"fine-tuning {base}: {stats.n_examples} examples, {stats.total_tokens:,}"
                      f" tokens x {epochs} epochs = {trained:,} trained tokens"
                      + (f", about {cost.format_usd(estimate)}" if estimate is not None else ""))
            self.budget.check(f"fine-tuning {base} on {stats.n_examples} examples", estimate)
            if not record.get("file_id"):
                record["file_id"] = self._upload(f"{slug(key)}.jsonl", data)
                self.records.write("jobs", key, record)
            start = {"from_checkpoint": checkpoint} if checkpoint else {"model": root}
            self._check_estimate(self._estimate(record["file_id"], start, epochs, config), base)
            with self._api("creating the fine-tuning job"):
                job = self.client.fine_tuning.create(
                    training_file=record["file_id"], **start, n_epochs=epochs,
                    batch_size=config.batch_size, learning_rate=config.learning_rate,
                    lr_scheduler_type="linear" if config.lr_scheduler == "linear" else "cosine",
                    warmup_ratio=config.warmup_ratio, lora=True, lora_r=config.lora_rank,
                    lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                    train_on_inputs=False, random_seed=config.seed, suffix=_suffix(key),
                    model_limits=limits)
            record.update(job_id=job.id, status=job.status, base=base, root=root,
                          examples=stats.n_examples, training_tokens=stats.total_tokens)
            self.records.write("jobs", key, record)
            self._say(f"fine-tuning job {job.id} created ({job.status})")
        job = self._wait_for_job(job, record)
        return ModelRef(record["output"], self.spending.add(self._job_usage(job, record)))

    def _find_job(self, record: dict):
        """The job already made for this key, if it completed or is still going: the one in
        the record, else one whose suffix carries the key's hash. Failed or cancelled jobs
        are left behind (a rerun is a deliberate new attempt, with a fresh upload)."""
        if record.get("job_id"):
            with self._api("looking up the recorded fine-tuning job"):
                job = self.client.fine_tuning.retrieve(record["job_id"])
            if job.status not in JOB_FAILED:
                self._say(f"resuming fine-tuning job {job.id} ({job.status})")
                return job
            record.update(job_id=None, file_id=None, status=job.status,
                          attempt=record.get("attempt", 0) + 1)
        suffix = _suffix(record["key"])
        with self._api("listing fine-tuning jobs"):
            listed = self.client.fine_tuning.list().data
        found = [job for job in listed if job.status not in JOB_FAILED and
                 (job.suffix == suffix or suffix in (_output_name(job) or ""))]
        if not found:
            return None
        job = max(found, key=lambda j: (j.status == "completed", j.created_at))
        record.update(job_id=job.id, file_id=job.training_file, status=job.status,
                      base=record.get("base") or job.from_checkpoint or job.model,
                      root=record.get("root") or job.model)
        self.records.write("jobs", record["key"], record)
        self._say(f"found fine-tuning job {job.id} ({job.status}) for this step; not creating "
                  "another")
        return job

    def _origin(self, base: str) -> tuple[str, str | None]:
        """(root model, checkpoint to continue): a model this backend fine-tuned continues
        from its output name on its root's limits and prices; anything else is a root."""
        for record in self.records.all("jobs"):
            if record.get("output") == base and record.get("root"):
                return record["root"], base
        return base, None

    def _model_limits(self, model: str):
        if model not in self._limits:
            with self._api(f"reading the fine-tuning limits of {model}"):
                self._limits[model] = self.client.fine_tuning.model_limits(model_name=model)
        return self._limits[model]

    def _upload(self, name: str, data: bytes) -> str:
        with self._api("uploading the training file"):
            upload = self.client.post(
                "/v1/files/upload", cast_to=FileResponse,
                body={"purpose": "fine-tune", "file_name": name, "file_type": "jsonl"},
                files=[("file", (name, data, "application/octet-stream"))],
                options={"headers": {"Content-Type": "multipart/form-data"}})
        return upload.id

    def quote(self, base: str, examples: Sequence[ChatExample], config):
        """Together's own estimate of fine-tuning ``base`` on ``examples`` (the estimate needs
        an uploaded file, so the file is uploaded; no job is created), or None when it gives
        none."""
        data = jsonl({"messages": list(ex)} for ex in examples)
        file_id = self._upload("semievol-estimate.jsonl", data)
        return self._estimate(file_id, {"model": base}, whole_epochs(config.epochs, "Together"),
                              config)

    def _estimate(self, file_id: str, start: dict, epochs: int, config):
        with self._api("asking Together to estimate the fine-tuning price"):
            estimate = self.client.fine_tuning.estimate_price(
                training_file=file_id, **start, n_epochs=epochs,
                training_type={"type": "Lora", "lora_r": config.lora_rank,
                               "lora_alpha": config.lora_alpha,
                               "lora_dropout": config.lora_dropout,
                               "lora_trainable_modules": "all-linear"},
                training_method={"method": "sft", "train_on_inputs": False})
        return estimate if getattr(estimate, "estimation_available", False) else None

    def _check_estimate(self, estimate, base: str) -> None:
        """Together's own price for the job, checked against the budget and the account's
        credit (``allowed_to_proceed``). An estimate it cannot give is no obstacle."""
        if estimate is None:
            return
        if estimate.allowed_to_proceed is False:
            raise BackendError(
                f"Together will not start this job: it would cost about "
                f"{cost.format_usd(estimate.estimated_total_price)}, over the account's "
                f"credit limit of {cost.format_usd(estimate.user_limit)}. Add credit and run "
                "again to resume.")
        self.budget.check(f"fine-tuning {base} (Together's estimate)",
                          estimate.estimated_total_price)

    def _wait_for_job(self, job, record: dict):
        """Poll until the job is done, its events on a progress bar; the completed job, or
        FinetuneFailed with the job's last error event."""
        seen: set[tuple] = set()
        last_error: list[str] = []
        bar = tqdm(desc=f"fine-tune {job.id}", unit="step", disable=self.quiet,
                   file=sys.stderr, leave=False)

        def fetch():
            with self._api(f"checking fine-tuning job {job.id}"):
                current = self.client.fine_tuning.retrieve(job.id)
                events = self.client.fine_tuning.list_events(job.id).data
            for event in events:
                mark = (event.created_at, event.message, event.type)
                if mark in seen:
                    continue
                seen.add(mark)
                bar.set_postfix_str(f"{current.status}: {event.message}"[:80])
                if event.level in ("error", "legacy_ierror") or event.type == "job_error":
                    last_error.append(event.message)
                if event.total_steps:
                    bar.total = event.total_steps
                if event.step:
                    bar.update(max(0, event.step - bar.n))
            if current.status != record.get("status"):
                record.update(status=current.status, output=_output_name(current))
                self.records.write("jobs", record["key"], record)
            return current

        try:
            job = fetch() if job.status in JOB_DONE else self._poll(
                fetch, lambda j: j.status in JOB_DONE)
        finally:
            bar.close()
        if job.status not in JOB_DONE:
            raise BackendError(
                f"fine-tuning job {job.id} is still {job.status} after {self.max_wait:g} s; "
                "run again to resume waiting on it (no second job is created)")
        record.update(status=job.status, output=_output_name(job))
        self.records.write("jobs", record["key"], record)
        if job.status != "completed":
            reason = last_error[-1] if last_error else "no reason given"
            raise FinetuneFailed(f"fine-tuning job {job.id} {job.status}: {scrub(reason, self._secret)}")
        if not record["output"]:
            raise BackendError(f"fine-tuning job {job.id} completed without an output model")
        self._say(f"fine-tuning job {job.id} completed: {record['output']}")
        return job

    def _job_usage(self, job, record: dict) -> Usage:
        """A finished job's trained tokens and their price: Together's own ``total_price``
        (nanodollars) when it reports one, else the table's."""
        trained = job.token_count or 0
        billed = f"ft:{record['root']}" if record.get("base") != record.get("root") \
            else record["root"]
        usd = job.total_price / 1e9 if job.total_price \
            else cost.training_cost(billed, trained, prices=self.prices)
        return Usage(trained_tokens=trained, cost_usd=usd)

    # -- generation ---------------------------------------------------------------------
    def generate_with_logprobs(self, model: str, prompts: Sequence[list[Message]], *,
                               n: int = 1, temperature: float = 0.0, max_tokens: int = 64,
                               seed: int | None = None) -> Generations:
        """One chat completion per prompt with ``n`` choices and the sampled tokens'
        logprobs (``logprobs=1``; an integer on Together), ``max_concurrency`` at a time."""
        priced = self._priced(model)
        if self.budget.limit_usd is not None:
            prompt_tokens = sum(cost.count_chat_tokens(p, priced) for p in prompts)
            self.budget.check(f"generating {n} x {len(prompts)} responses with {model}",
                              cost.chat_cost(priced, prompt_tokens, len(prompts) * n * max_tokens,
                                             prices=self.prices))
        bodies = [dict(model=model, messages=[dict(m) for m in p], n=n, temperature=temperature,
                       max_tokens=max_tokens, logprobs=1,
                       **({"seed": seed} if seed is not None else {})) for p in prompts]
        with ThreadPoolExecutor(self.max_concurrency) as pool:
            answers = list(pool.map(lambda body: self._chat(body, priced), bodies))
        return Generations.of(answers)

    def _chat(self, body: dict, priced: str) -> tuple[list[Generation], Usage]:
        with self._api(f"chat completion with {body['model']}"):
            completion = self.client.chat.completions.create(**body)
        used = Usage()
        if (usage := completion.usage) is not None:
            used.add(prompt=usage.prompt_tokens, completion=usage.completion_tokens,
                     cost=cost.chat_cost(priced, usage.prompt_tokens, usage.completion_tokens,
                                         prices=self.prices))
        self.spending.add(used)
        choices = sorted(completion.choices, key=lambda c: c.index or 0)
        if len(choices) != body["n"]:
            raise BackendError(f"asked {body['model']} for {body['n']} samples, the server "
                               f"returned {len(choices)} choices")
        generations = []
        for choice in choices:
            text = (choice.message.content if choice.message else choice.text) or ""
            part = choice.logprobs
            tokens, logprobs = (part.tokens or [], part.token_logprobs or []) if part else ([], [])
            if text and not logprobs or len(tokens) != len(logprobs):
                raise BackendError(f"{body['model']} returned no usable token logprobs "
                                   "(the server must support integer logprobs)")
            generations.append(Generation(
                text=text, tokens=tuple(tokens), logprobs=tuple(logprobs),
                finish_reason="length" if choice.finish_reason == "length" else "stop"))
        return generations, used

    def _priced(self, model: str) -> str:
        """The name ``model`` is priced under: ``ft:ROOT`` for a model fine-tuned here."""
        root, checkpoint = self._origin(model)
        return f"ft:{root}" if checkpoint else model

    # -- embeddings ---------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> Embeddings:
        """L2-normalised embeddings with ``embed_model``, in requests of at most
        EMBED_MAX_INPUTS texts and EMBED_MAX_TOKENS tokens."""

        def request(batch: list[str]):
            with self._api(f"embedding with {self.embed_model}"):
                return self.client.embeddings.create(model=self.embed_model, input=batch)

        return embed_in_batches(texts, request, model=self.embed_model, prices=self.prices,
                                spending=self.spending, max_inputs=EMBED_MAX_INPUTS,
                                max_tokens=EMBED_MAX_TOKENS)

    def runtime(self) -> dict:
        """A hosted API: the provider's devices and number types are not known here."""
        return {"world_size": 1, "device": "remote", "dtype": "unknown",
                "generation_engine": "api", "versions": library_versions()}

    # -- plumbing -----------------------------------------------------------------------
    @contextmanager
    def _api(self, what: str):
        """SDK errors as semievol's (:func:`~semievol.backends.hosted.sdk_errors`)."""
        try:
            with sdk_errors(together, what, where=self.base_url, client=self.client,
                            secret=self._secret, key_env="TOGETHER_API_KEY",
                            base=together.TogetherError):
                yield
        except ValueError as e:  # the SDK's own checks of a job request
            raise ConfigError(f"{what}: {scrub(str(e), self._secret)}") from None

    def _poll(self, fetch: Callable, done: Callable):
        return poll(fetch, done, interval=self.poll_interval, max_wait=self.max_wait)

    def _say(self, message: str) -> None:
        say(message, quiet=self.quiet)


def ask_price(task, config, *, base_url: str | None, api_key: str | None,
              timeout: float = 5.0) -> str:
    """One line for ``semievol run --backend together --dry-run``: Together's own estimate
    of the warm-up fine-tune, asked of ``/v1/fine-tunes/estimate-price`` with a short
    timeout and no retries; where the API cannot be reached (offline) or no key is set, a
    line saying the table's estimate stands."""
    from .. import prompts

    try:
        backend = TogetherBackend(config.model, base_url=base_url, api_key=api_key,
                                  timeout=timeout, max_retries=0, quiet=True)
        examples = [prompts.training_example(e, e.answer, config.prompt_style)
                    for e in task.labeled]
        estimate = backend.quote(backend.default_model, examples, config.finetune)
    except (ConfigError, BackendError) as e:
        return f"\nTogether's estimate-price endpoint was not asked or not reached ({e}); " \
               "the table's estimate stands."
    if estimate is None:
        return "\nTogether gave no estimate for the warm-up fine-tune; the table's stands."
    return (f"\nTogether's own estimate for the warm-up fine-tune: "
            f"{cost.format_usd(estimate.estimated_total_price)} "
            f"({estimate.estimated_train_token_count or 0:,.0f} trained tokens"
            + ("; over the account's credit limit" if estimate.allowed_to_proceed is False
               else "") + ")")


# -- training data --------------------------------------------------------------------

def validate_training_data(examples: Sequence[ChatExample], model: str, config, limits, *,
                           data: bytes) -> TrainingStats:
    """Check a job before anything is uploaded, as Together would refuse it: every example
    in Together's conversational format (roles system/user/assistant, string contents, a
    0/1 ``weight``, an assistant answer: the loss is on the answers), ``data`` (the JSONL to
    upload) through the SDK's own file check, every example within the model's
    ``max_seq_length_sft`` tokens, and the hyperparameters within ``limits`` (the model's
    ``/v1/fine-tunes/models/limits``). DataError for the data, ConfigError for a setting."""
    problems = [f"example {i}: {bad}" for i, example in enumerate(examples)
                if (bad := example_problem(example, ROLES, MESSAGE_KEYS))]
    if not problems:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "train.jsonl"
            path.write_bytes(data)
            report = check_file(path, purpose="fine-tune")
        if not report["is_check_passed"]:
            problems.append(report["message"])
    if problems:
        raise DataError(f"{len(problems)} problems make the training data invalid for "
                        "Together fine-tuning: " + "; ".join(problems[:5])
                        + ("; ..." if len(problems) > 5 else ""), field="messages")
    lengths = [cost.count_chat_tokens(ex, model) for ex in examples]
    longest = limits.max_seq_length_sft
    too_long = [f"example {i}: {n:,} tokens" for i, n in enumerate(lengths)
                if longest and n > longest]
    if too_long:
        raise DataError(f"{len(too_long)} training examples are longer than the "
                        f"{longest:,} tokens {model} trains on: "
                        + "; ".join(too_long[:5]), field="messages")
    lora = limits.lora_training
    checks = [  # (what, value, lowest, highest); a limit not stated (absent, 0) is none
        ("LoRA rank", config.lora_rank, 1, lora and lora.max_rank),
        ("batch size", config.batch_size, lora and lora.min_batch_size,
         lora and lora.max_batch_size),
        ("learning rate", config.learning_rate, limits.min_learning_rate,
         limits.max_learning_rate),
        ("epochs", config.epochs, 1, limits.max_num_epochs)]
    problems = [f"{what} {value:g} is outside {low or '-inf'}..{high or 'inf'}"
                for what, value, low, high in checks
                if (low and value < low) or (high and value > high)]
    if problems:
        raise ConfigError(f"Together's limits for fine-tuning {model}: " + "; ".join(problems))
    return TrainingStats(len(examples), sum(lengths), max(lengths))


def _suffix(key: str) -> str:
    """The job's suffix: a hash of the key, found again by it (Together: 40 characters)."""
    return SUFFIX_PREFIX + digest(key)[:16]


def _output_name(job) -> str | None:
    """The model a job makes (``model_output_name``, under whichever alias the SDK type
    gives it)."""
    return job.to_dict().get("model_output_name") or getattr(job, "output_name", None)
