"""The OpenAI backend: fine-tuning jobs, chat completions with logprobs, embeddings — through
the official ``openai`` SDK only, against api.openai.com or any server that speaks its API
(``semievol serve`` with ``base_url="http://127.0.0.1:PORT/v1"``).

What it promises beyond the Backend protocol:

* **Never pay twice.** A fine-tune is found again by its idempotency ``key``: first in the
  record ``workdir/jobs/<slug>.json`` (written atomically the moment the file id and the job
  id exist), then among the organisation's jobs by ``metadata["semievol_key"]``. A job that
  succeeded is reused, one still running is waited on; only when neither exists is a job
  created, with an ``Idempotency-Key`` header. Batch-mode generation
  (:mod:`.openai_batch`) keeps its batch ids in ``workdir/batches/`` the same way, and
  resubmits only the requests that failed or expired.
* **Validated before upload**, as OpenAI's file validation and the cookbook's data-prep
  check do (:func:`validate_training_data`): roles, string contents, an assistant message per
  example, at least 10 examples, the per-example token limit of the target model.
* **Costs are known.** Each spending step is priced first (:mod:`semievol.cost`) and checked
  against ``max_cost_usd``; each call's result carries the tokens and dollars the API
  reported for it (``.usage``), and their running total (``spending``) feeds the budget.
* **Faults.** The SDK retries 408/409/429/5xx and connection errors (honouring Retry-After)
  ``max_retries`` times, each request limited to ``timeout`` seconds; we poll jobs and
  batches with tenacity. What still fails is translated, in :meth:`OpenAIBackend._api`
  only, into the semievol tree; every step is resumable by running again::

      openai.APIConnectionError, APITimeoutError ─┐
      openai.AuthenticationError, PermissionDenied├─> BackendError  (message says what to do)
      openai.RateLimitError, other APIStatusError ┘
      jobs.create refused: no fine-tuning access ───> BackendError naming --backend together
                                                      and --backend hf
      job status failed / cancelled ─────────────────> FinetuneFailed (the job's own error)
      invalid training examples ─────────────────────> DataError
      a step that would pass max_cost_usd ───────────> BudgetExceeded
      no API key, fractional epochs ─────────────────> ConfigError

* **The API key** comes from the argument or ``OPENAI_API_KEY`` and lives only inside the
  SDK client: it is never written to the workdir, logged, or left in an error message. A
  server on loopback (``semievol serve`` without ``--api-key``) needs none; the SDK is then
  given the placeholder ``"semievol-local"``.

Embeddings: ``text-embedding-3-small`` on OpenAI; with a ``base_url`` the served model itself
(``semievol serve`` embeds with the model it serves), unless ``embed_model`` names another.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import openai
from openai.types.chat import ChatCompletion

from .. import cost
from ..chatfile import MIN_EXAMPLES, example_problem
from ..errors import BackendError, ConfigError, DataError, FinetuneFailed
from ..rundir import digest, slug
from ..types import ChatExample, Embeddings, Generation, Generations, Message, ModelRef, Usage
from . import library_versions
from .hosted import (Records, Spending, TrainingStats, embed_in_batches, is_loopback, jsonl,
                     poll, say, scrub, sdk_errors, server_message, whole_epochs)
from .openai_batch import BatchAPI

__all__ = ["OpenAIBackend", "validate_training_data", "TrainingStats"]

DEFAULT_MODEL = "gpt-4o-mini-2024-07-18"

DEFAULT_EMBED_MODEL = "text-embedding-3-small"

LOCAL_API_KEY = "semievol-local"
"""What the SDK is given as key for a loopback server when no key is set."""

TRAINING_TOKEN_LIMITS = {"gpt-4o-mini": 65_536, "gpt-4o": 65_536, "gpt-4.1": 65_536,
                         "gpt-4.1-mini": 65_536, "gpt-4.1-nano": 65_536,
                         "gpt-3.5-turbo": 16_385}
"""Tokens one training example may have, per base model (OpenAI's fine-tuning guide)."""
DEFAULT_TRAINING_TOKEN_LIMIT = 65_536

EMBED_MAX_INPUTS = 2048
EMBED_MAX_TOKENS = 270_000
"""Per embeddings request: the API allows 2048 inputs and 300k tokens; 10% margin because
offline the tokens may be counted with a neighbouring tokenizer."""


JOB_LIST_PAGES = 10
"""Pages of 100 jobs searched for one carrying the key (the metadata filter makes it one)."""
JOB_DONE = {"succeeded", "failed", "cancelled"}


class OpenAIBackend:
    """The Backend protocol over the OpenAI API (see the module docstring)."""

    name = "openai"
    min_finetune_examples = MIN_EXAMPLES

    def __init__(self, model: str | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, workdir: str | Path | None = None,
                 max_concurrency: int = 8, batch_mode: bool = False,
                 prices: dict | None = None, max_cost_usd: float | None = None,
                 spent_usd: float = 0.0,
                 embed_model: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5, poll_interval: float = 5.0,
                 max_wait: float | None = None, quiet: bool = False, http_client=None,
                 extra_body: dict | None = None):
        """
        ``workdir``: where job and batch records are kept (the run directory's own folder);
        None keeps none, and only the API's job list protects against paying twice.
        ``embed_model``: None means OpenAI's ``text-embedding-3-small``, or with a
        ``base_url`` the served model itself (``semievol serve`` embeds with its model).
        ``max_concurrency``: chat requests in flight at once. ``batch_mode``: generate
        through the Batch API (half price, results within 24 h). ``prices``: overrides of
        :data:`semievol.cost.PRICES`. ``max_cost_usd``: stop before a step that would take
        spending past it, counting ``spent_usd`` (an earlier part of a resumed run). ``timeout``: seconds per HTTP request;
        ``max_retries``: the SDK's retries per request. ``poll_interval``: first wait between
        job/batch polls (backing off to 12x). ``max_wait``: give up waiting on a job or batch
        after this many seconds (None: wait as long as it takes); the run resumes waiting on
        it when run again. ``http_client``: an ``httpx2.Client`` for the SDK (proxies, test
        hooks). ``quiet``: no progress lines on stderr. ``extra_body``: fields added to every
        chat request (not in batch mode), beyond the API's own: vLLM's ``top_k``, ``min_p``...
        """
        self.default_model = model or DEFAULT_MODEL
        self.embed_model = embed_model or (self.default_model if base_url
                                           else DEFAULT_EMBED_MODEL)
        self.workdir = Path(workdir) if workdir is not None else None
        self.records = Records(workdir)
        self.max_concurrency = max_concurrency
        self.batch_mode = batch_mode
        self.prices = cost.price_table(prices)
        self.poll_interval = poll_interval
        self.max_wait = max_wait
        self.quiet = quiet
        self.extra_body = extra_body
        self.spending = Spending(max_cost_usd, spent_usd)
        self.budget = self.spending.budget
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if not (base_url and is_loopback(base_url)):
                raise ConfigError("no OpenAI API key: set OPENAI_API_KEY (or pass --api-key)")
            key = LOCAL_API_KEY
        self._secret = key
        self.client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout,
                                    max_retries=max_retries, http_client=http_client)
        self.batches = BatchAPI(self.client, self.records, errors=self._api, say=self._say,
                                poll=self._poll, parse=partial(self._generations, batch=True))
        """Batch-mode generation (:mod:`.openai_batch`)."""

    def __repr__(self) -> str:
        return f"OpenAIBackend(model={self.default_model!r}, base_url={self.base_url!r})"

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    # -- fine-tuning --------------------------------------------------------------------
    def finetune(self, base: str, examples: Sequence[ChatExample], config, *,
                 key: str) -> ModelRef:
        """Supervised fine-tuning job on ``base`` (a model or an ``ft:`` model, to continue
        training); returns the ``fine_tuned_model``. Reuses or resumes the job of ``key``."""
        epochs = whole_epochs(config.epochs, "OpenAI")
        record = self.records.read("jobs", key) or {"key": key}
        tag = _tag(key)
        job = self._find_job(record, tag)
        if job is None:
            stats = validate_training_data(examples, base)
            trained = stats.total_tokens * epochs
            estimate = cost.training_cost(base, trained, prices=self.prices)
            self._say(f"fine-tuning {base}: {stats.n_examples} examples, {stats.total_tokens:,}"
                      f" tokens x {epochs} epochs = {trained:,} trained tokens"
                      + (f", about {cost.format_usd(estimate)}" if estimate is not None else ""))
            self.budget.check(f"fine-tuning {base} on {stats.n_examples} examples", estimate)
            data = jsonl({"messages": list(ex)} for ex in examples)
            if not record.get("file_id"):
                with self._api("uploading the training file"):
                    upload = self.client.files.create(
                        file=(f"{slug(key)}.jsonl", data, "application/jsonl"),
                        purpose="fine-tune")
                record["file_id"] = upload.id
                self.records.write("jobs", key, record)
            hyperparameters = {"n_epochs": epochs, "batch_size": config.batch_size}
            if config.learning_rate_multiplier is not None:
                hyperparameters["learning_rate_multiplier"] = config.learning_rate_multiplier
            attempt = record.get("attempt", 0)
            with self._api("creating the fine-tuning job"), self._finetuning_access():
                job = self.client.fine_tuning.jobs.create(
                    model=base, training_file=record["file_id"],
                    method={"type": "supervised",
                            "supervised": {"hyperparameters": hyperparameters}},
                    seed=config.seed, suffix=_suffix(key),
                    metadata={"semievol_key": tag, "semievol_data": digest(data)[:16]},
                    extra_headers={"Idempotency-Key": f"semievol-{digest(key)[:32]}-{attempt}"})
            record.update(job_id=job.id, status=job.status, base=base,
                          examples=stats.n_examples, training_tokens=stats.total_tokens)
            self.records.write("jobs", key, record)
            self._say(f"fine-tuning job {job.id} created ({job.status})")
        job = self._wait_for_job(job, record)
        trained = job.trained_tokens or 0
        return ModelRef(job.fine_tuned_model, self.spending.add(Usage(
            trained_tokens=trained, cost_usd=cost.training_cost(base, trained,
                                                                prices=self.prices))))

    def _find_job(self, record: dict, tag: str):
        """The job already made for this key, if it succeeded or is still going: the one in
        the record, else one carrying the key in its metadata. Failed or cancelled jobs are
        left behind (a rerun is a deliberate new attempt)."""
        if record.get("job_id"):
            with self._api("looking up the recorded fine-tuning job"):
                job = self.client.fine_tuning.jobs.retrieve(record["job_id"])
            if job.status not in ("failed", "cancelled"):
                self._say(f"resuming fine-tuning job {job.id} ({job.status})")
                return job
            # a rerun after a failure is a new attempt, with a fresh upload
            record.update(job_id=None, file_id=None, status=job.status,
                          attempt=record.get("attempt", 0) + 1)
        found = []
        with self._api("listing fine-tuning jobs"):
            page = self.client.fine_tuning.jobs.list(metadata={"semievol_key": tag}, limit=100)
            for _ in range(JOB_LIST_PAGES):
                # check the metadata again: a server may ignore the filter
                found += [job for job in page.data
                          if (job.metadata or {}).get("semievol_key") == tag
                          and job.status not in ("failed", "cancelled")]
                if not page.has_next_page():
                    break
                page = page.get_next_page()
        if not found:
            return None
        job = max(found, key=lambda j: (j.status == "succeeded", j.created_at))
        record.update(job_id=job.id, file_id=job.training_file, status=job.status)
        self.records.write("jobs", record["key"], record)
        self._say(f"found fine-tuning job {job.id} ({job.status}) for this step; not creating "
                  "another")
        return job

    def _wait_for_job(self, job, record: dict):
        """Poll until the job is done, printing its new events; the job that succeeded, or
        FinetuneFailed with the job's own error."""
        seen: set[str] = set()

        def fetch():
            with self._api(f"checking fine-tuning job {job.id}"):
                current = self.client.fine_tuning.jobs.retrieve(job.id)
                events = self.client.fine_tuning.jobs.list_events(job.id, limit=10).data
            if current.status != record.get("status"):
                self._say(f"  {job.id}: status {current.status}")
                record.update(status=current.status, fine_tuned_model=current.fine_tuned_model)
                self.records.write("jobs", record["key"], record)
            for event in reversed(events):          # the API lists the newest first
                if event.id not in seen:
                    seen.add(event.id)
                    self._say(f"  {job.id}: {event.message}")
            return current

        job = job if job.status in JOB_DONE else self._poll(fetch, lambda j: j.status in JOB_DONE)
        if job.status not in JOB_DONE:
            raise BackendError(
                f"fine-tuning job {job.id} is still {job.status} after {self.max_wait:g} s; "
                "run again to resume waiting on it (no second job is created)")
        record.update(status=job.status, fine_tuned_model=job.fine_tuned_model)
        self.records.write("jobs", record["key"], record)
        if job.status != "succeeded":
            reason = (f"{job.error.code}: {job.error.message}" if job.error and job.error.message
                      else "no reason given")
            raise FinetuneFailed(f"fine-tuning job {job.id} {job.status}: "
                                 f"{scrub(reason, self._secret)}")
        self._say(f"fine-tuning job {job.id} succeeded: {job.fine_tuned_model}")
        return job

    # -- generation ---------------------------------------------------------------------
    def generate_with_logprobs(self, model: str, prompts: Sequence[list[Message]], *,
                               n: int = 1, temperature: float = 0.0, max_tokens: int = 64,
                               seed: int | None = None) -> Generations:
        """One chat completion per prompt with ``n`` choices and token logprobs (the prompt
        is billed once, not n times); ``max_concurrency`` requests at a time, or one Batch
        API job per 50,000 prompts in batch mode."""
        if self.budget.limit_usd is not None:
            prompt_tokens = sum(cost.count_chat_tokens(p, model) for p in prompts)
            self.budget.check(
                f"generating {n} x {len(prompts)} responses with {model}",
                cost.chat_cost(model, prompt_tokens, len(prompts) * n * max_tokens,
                               batch=self.batch_mode, prices=self.prices))
        bodies = [_chat_body(model, p, n=n, temperature=temperature, max_tokens=max_tokens,
                             seed=seed) for p in prompts]
        if self.batch_mode:
            answers = self.batches.generate(bodies)
        else:
            with ThreadPoolExecutor(self.max_concurrency) as pool:
                answers = list(pool.map(self._chat, bodies))
        return Generations.of(answers)

    def _chat(self, body: dict) -> tuple[list[Generation], Usage]:
        with self._api(f"chat completion with {body['model']}"):
            completion = self.client.chat.completions.create(**body, extra_body=self.extra_body)
        return self._generations(completion, body)

    def _generations(self, completion: ChatCompletion, body: dict, *,
                     batch: bool = False) -> tuple[list[Generation], Usage]:
        """The n choices of a completion as Generations (tokens and logprobs from
        ``choices[i].logprobs.content``), and what the completion used (counted in the
        budget's total)."""
        used = Usage()
        if (usage := completion.usage) is not None:
            details = usage.prompt_tokens_details
            cached = (details.cached_tokens or 0) if details else 0
            used.add(prompt=usage.prompt_tokens, completion=usage.completion_tokens,
                     cost=cost.chat_cost(body["model"], usage.prompt_tokens,
                                         usage.completion_tokens, cached_tokens=cached,
                                         batch=batch, prices=self.prices))
        self.spending.add(used)
        choices = sorted(completion.choices, key=lambda c: c.index)
        if len(choices) != body["n"]:
            raise BackendError(f"asked {completion.model or body['model']} for {body['n']} "
                               f"samples, the server returned {len(choices)} choices")
        generations = []
        for choice in choices:
            text = choice.message.content or ""
            content = (choice.logprobs.content if choice.logprobs else None) or []
            if text and not content:
                raise BackendError(f"{body['model']} returned no token logprobs "
                                   "(the server must support logprobs=true)")
            generations.append(Generation(
                text=text, tokens=tuple(t.token for t in content),
                logprobs=tuple(t.logprob for t in content),
                finish_reason=choice.finish_reason or "stop"))
        return generations, used

    # -- embeddings ---------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> Embeddings:
        """L2-normalised embeddings with ``embed_model``, in requests of at most 2048 inputs
        and the API's token limit."""

        def request(batch: list[str]):
            with self._api(f"embedding with {self.embed_model}"):
                return self.client.embeddings.create(model=self.embed_model, input=batch,
                                                     encoding_format="float")

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
        with sdk_errors(openai, what, where=self.base_url, client=self.client,
                        secret=self._secret, key_env="OPENAI_API_KEY", base=openai.OpenAIError):
            yield

    @contextmanager
    def _finetuning_access(self):
        """Around ``jobs.create``: a refusal for lost fine-tuning access
        (:func:`lost_finetuning_access`) becomes the message that says so and what to use
        instead; anything else goes on to :meth:`_api`."""
        try:
            yield
        except openai.APIStatusError as e:
            if not lost_finetuning_access(e):
                raise
            reason = f"HTTP {e.status_code}: {server_message(e, self._secret)}"
            raise BackendError(FINETUNING_CLOSED.format(reason=reason)) from None

    def _poll(self, fetch: Callable, done: Callable):
        """Poll every poll_interval, backing off, for at most max_wait seconds."""
        return poll(fetch, done, interval=self.poll_interval, max_wait=self.max_wait)

    def _say(self, message: str) -> None:
        say(message, quiet=self.quiet)



# -- OpenAI closing fine-tuning ------------------------------------------------------------

FINETUNING_CLOSED = (
    "OpenAI refused to create the fine-tuning job: this organisation has no fine-tuning "
    "access ({reason}). OpenAI is closing self-serve fine-tuning (API deprecations page, "
    "2026-05-07): organisations that never fine-tuned cannot create jobs since 2026-05-07, "
    "those with no fine-tuned-model inference in the last 60 days since 2026-07-02, and no "
    "one can from 2027-01-06. Nothing was trained or paid for this step. Evolve a hosted "
    "open model with --backend together (set TOGETHER_API_KEY), or a local one with "
    "--backend hf.")

_ACCESS = re.compile(r"\b(access|not (available|allowed|permitted|enabled|eligible|supported)"
                     r"|no longer|unavailable|disabled|deprecat\w*|sunset|shut ?down|retired"
                     r"|closed)\b")


def lost_finetuning_access(error: openai.APIStatusError) -> bool:
    """Whether a refused ``jobs.create`` means the organisation may not fine-tune. A 403
    there always does: the same key has just listed jobs and uploaded the file, so it is
    the job that is forbidden. A 400 or 404 does when its code or message speaks of
    fine-tuning being unavailable to the organisation (the wording is OpenAI's to change;
    the test pins the forms it has taken)."""
    if error.status_code == 403:
        return True
    if error.status_code not in (400, 404):
        return False
    body = error.body if isinstance(error.body, dict) else {}
    text = " ".join(str(body.get(k) or "") for k in ("code", "message", "type"))
    text = re.sub(r"[_-]+", " ", f"{text} {error.message}".lower())
    return bool(re.search(r"fine ?tun", text) and _ACCESS.search(text))


# -- training data --------------------------------------------------------------------

def validate_training_data(examples: Sequence[ChatExample], model: str) -> TrainingStats:
    """Check chat examples as OpenAI's file validation does before any upload: each is a list
    of messages with known roles and keys, string contents, a 0/1 weight if any, at least one
    assistant message, and no more tokens than ``model`` takes per example; at least 10
    examples. Raises one DataError naming the first few bad examples."""
    limit = cost.match_model(TRAINING_TOKEN_LIMITS, cost.base_of(model)) \
        or DEFAULT_TRAINING_TOKEN_LIMIT
    problems: list[str] = []
    lengths: list[int] = []
    for i, example in enumerate(examples):
        bad = example_problem(example)
        if bad is None:
            tokens = cost.count_chat_tokens(example, model)
            lengths.append(tokens)
            if tokens > limit:
                bad = f"{tokens:,} tokens, over the {limit:,} a {cost.base_of(model)} " \
                      "training example may have"
        if bad:
            problems.append(f"example {i}: {bad}")
    if problems:
        raise DataError(f"{len(problems)} of {len(examples)} training examples are not valid "
                        "for OpenAI fine-tuning: " + "; ".join(problems[:5])
                        + ("; ..." if len(problems) > 5 else ""), field="messages")
    if len(examples) < MIN_EXAMPLES:
        raise DataError(f"OpenAI fine-tuning needs at least {MIN_EXAMPLES} training examples, "
                        f"got {len(examples)}")
    return TrainingStats(len(examples), sum(lengths), max(lengths))


# -- small pure helpers ---------------------------------------------------------------

def _chat_body(model: str, messages: list[Message], *, n: int, temperature: float,
               max_tokens: int, seed: int | None) -> dict:
    body = {"model": model, "messages": [dict(m) for m in messages], "n": n,
            "temperature": temperature, "max_completion_tokens": max_tokens, "logprobs": True}
    if seed is not None:
        body["seed"] = seed
    return body


def _suffix(key: str) -> str:
    """The job's model-name suffix (OpenAI allows up to 64 characters)."""
    return ("semievol-" + re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-"))[:40].strip("-")


def _tag(key: str) -> str:
    """The key as a metadata value (at most 512 characters)."""
    return key if len(key) <= 512 else "sha256:" + digest(key)
