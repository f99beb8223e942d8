"""The OpenAI backend: fine-tuning jobs, chat completions with logprobs, embeddings, through
the official ``openai`` SDK only, against api.openai.com or any server that speaks its API
(``semievol serve`` with ``base_url="http://127.0.0.1:PORT/v1"``).

:class:`OpenAI` is the provider's adapter; the lifecycle it plugs into (never paying twice,
budgets, polling, error translation, keys) is :class:`~.hosted.HostedBackend`'s, and
``OpenAIBackend(...)`` builds one. What OpenAI adds:

* **Found again by metadata.** A job carries its key in ``metadata["semievol_key"]``, and
  is created with an ``Idempotency-Key`` header (a new one per attempt after a failure).
  Batch-mode generation (:mod:`.openai_batch`) keeps its batch ids in ``workdir/batches/``
  the same way, and resubmits only the requests that failed or expired.
* **Validated before upload**, as OpenAI's file validation and the cookbook's data-prep
  check do (:func:`validate_training_data`): roles, string contents, an assistant message per
  example, at least 10 examples, the per-example token limit of the target model.
* **Evolve continues the warm-up model**: an ``ft:`` model is simply the job's base.
* **Closing fine-tuning**: a refused ``jobs.create`` that means the organisation may no
  longer fine-tune (:func:`lost_finetuning_access`) is a BackendError that says so and
  names ``--backend together`` and ``--backend hf``; invalid examples are a DataError.

Embeddings: ``text-embedding-3-small`` on OpenAI; with a ``base_url`` the served model itself
(``semievol serve`` embeds with the model it serves), unless ``embed_model`` names another.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from urllib.parse import urlparse

import openai

from .. import cost
from ..chatfile import MIN_EXAMPLES, example_problem
from ..errors import BackendError, DataError
from ..rundir import digest
from ..types import ChatExample, Generation, Message
from .api_errors import server_message
from .hosted import HostedBackend, jsonl
from .provider import Event, Job, Plan, TrainingStats
from .openai_batch import BatchAPI

__all__ = ["OpenAIBackend", "OpenAI", "validate_training_data", "TrainingStats"]

DEFAULT_MODEL = "gpt-4o-mini-2024-07-18"

DEFAULT_EMBED_MODEL = "text-embedding-3-small"

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


def OpenAIBackend(model: str | None = None, **options) -> HostedBackend:
    """The Backend protocol over the OpenAI API: ``HostedBackend(OpenAI(), model,
    **options)`` (the options are :class:`~.hosted.HostedBackend`'s; ``batch_mode`` sends
    generation through the Batch API, at half price)."""
    return HostedBackend(OpenAI(), model, **options)


class OpenAI:
    """The OpenAI API as a :class:`~.provider.Provider` (see the module docstring)."""

    name, title, key_env = "openai", "OpenAI", "OPENAI_API_KEY"
    sdk, sdk_error = openai, openai.OpenAIError
    default_model, default_embed_model = DEFAULT_MODEL, DEFAULT_EMBED_MODEL
    min_finetune_examples = MIN_EXAMPLES
    prices = cost.OPENAI_PRICE_LIST
    embed_limits = (EMBED_MAX_INPUTS, EMBED_MAX_TOKENS)
    succeeded, failed = "succeeded", frozenset({"failed", "cancelled"})
    output_field = "fine_tuned_model"

    def connect(self, **options):
        return openai.OpenAI(**options)

    def batches(self, backend: HostedBackend) -> BatchAPI:
        return BatchAPI(backend.client, backend.records, errors=backend.errors,
                        say=backend.say, poll=backend.poll,
                        parse=partial(backend.generations, batch=True))

    # -- fine-tuning jobs ----------------------------------------------------------------
    def prepare(self, backend, base: str, examples: Sequence[ChatExample], config, *,
                epochs: int, key: str) -> Plan:
        stats = validate_training_data(examples, base)
        if (ends := shutdown_date(backend, cost.base_of(base))) is not None:
            backend.say(f"note: OpenAI stops serving {cost.base_of(base)} and every fine-tune "
                        f"built on it on {ends}, and creates no fine-tuning jobs for anyone "
                        f"from {FINETUNING_ENDS}: the model this run makes stops working then")
        data = jsonl({"messages": list(ex)} for ex in examples)
        hyperparameters = {"n_epochs": epochs, "batch_size": config.batch_size}
        if config.learning_rate_multiplier is not None:
            hyperparameters["learning_rate_multiplier"] = config.learning_rate_multiplier
        return Plan(data, stats, cost.base_of(base), {
            "model": base, "seed": config.seed, "suffix": _suffix(key),
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            "metadata": {"semievol_key": _tag(key), "semievol_data": digest(data)[:16]}})

    def upload(self, backend, name: str, data: bytes) -> str:
        return backend.client.files.create(file=(name, data, "application/jsonl"),
                                           purpose="fine-tune").id

    def create(self, backend, plan: Plan, record: dict) -> Job:
        """``jobs.create``; a refusal for lost fine-tuning access
        (:func:`lost_finetuning_access`) becomes the message that says so and what to use
        instead."""
        attempt = f"semievol-{digest(record['key'])[:32]}-{record.get('attempt', 0)}"
        try:
            job = backend.client.fine_tuning.jobs.create(
                training_file=record["file_id"], **plan.request,
                extra_headers={"Idempotency-Key": attempt})
        except openai.APIStatusError as e:
            if not lost_finetuning_access(e):
                raise
            reason = f"HTTP {e.status_code}: {backend.scrub(server_message(e))}"
            raise BackendError(FINETUNING_CLOSED.format(reason=reason)) from None
        return _job(job)

    def retrieve(self, backend, job_id: str) -> Job:
        return _job(backend.client.fine_tuning.jobs.retrieve(job_id))

    def find(self, backend, key: str) -> list[Job]:
        tag, found = _tag(key), []
        page = backend.client.fine_tuning.jobs.list(metadata={"semievol_key": tag}, limit=100)
        for _ in range(JOB_LIST_PAGES):
            # check the metadata again: a server may ignore the filter
            found += [_job(job) for job in page.data
                      if (job.metadata or {}).get("semievol_key") == tag]
            if not page.has_next_page():
                break
            page = page.get_next_page()
        return found

    def events(self, backend, job_id: str) -> list[Event]:
        listed = backend.client.fine_tuning.jobs.list_events(job_id, limit=10).data
        return [_event(e) for e in reversed(listed)]    # the API lists the newest first

    # -- generation and embeddings --------------------------------------------------------
    def chat_body(self, model: str, messages: list[Message], *, n: int, temperature: float,
                  max_tokens: int, seed: int | None) -> dict:
        body = {"model": model, "messages": [dict(m) for m in messages], "n": n,
                "temperature": temperature, "max_completion_tokens": max_tokens,
                "logprobs": True}
        if seed is not None:
            body["seed"] = seed
        return body

    def generation(self, choice, model: str) -> Generation:
        """Tokens and logprobs from ``choice.logprobs.content``."""
        text = choice.message.content or ""
        content = (choice.logprobs.content if choice.logprobs else None) or []
        if text and not content:
            raise BackendError(f"{model} returned no token logprobs "
                               "(the server must support logprobs=true)")
        return Generation(text=text, tokens=tuple(t.token for t in content),
                          logprobs=tuple(t.logprob for t in content),
                          finish_reason=choice.finish_reason or "stop")

    def embed_body(self, model: str, texts: list[str]) -> dict:
        return {"model": model, "input": texts, "encoding_format": "float"}


def _event(event) -> Event:
    """A metrics event carries the step in its ``data``."""
    data = event.data if isinstance(event.data, dict) else {}
    return Event(event.id, event.message, data.get("step"), data.get("total_steps"),
                 error=event.level == "error")


def _job(job) -> Job:
    error = f"{job.error.code}: {job.error.message}" if job.error and job.error.message \
        else None
    return Job(job.id, job.status, job.fine_tuned_model, job.training_file, job.created_at,
               base=job.model, root=cost.base_of(job.model),
               trained_tokens=job.trained_tokens or 0, error=error)


# -- OpenAI closing fine-tuning ------------------------------------------------------------

FINETUNING_CLOSED = (
    "OpenAI refused to create the fine-tuning job: this organisation has no fine-tuning "
    "access ({reason}). OpenAI is closing self-serve fine-tuning (API deprecations page, "
    "2026-05-07): organisations that never fine-tuned cannot create jobs since 2026-05-07, "
    "those with no fine-tuned-model inference in the last 60 days since 2026-07-02, and no "
    "one can from 2027-01-06; gpt-4o-mini-2024-07-18, gpt-4o, gpt-4.1 and gpt-4.1-mini and "
    "every fine-tune built on them stop serving on 2027-01-14. Nothing was trained or paid "
    "for this step. Evolve a hosted open model with --backend together (set "
    "TOGETHER_API_KEY), or a local one with --backend hf.")

FINETUNING_ENDS = "2027-01-06"
"""No new fine-tuning jobs for anyone from this day (OpenAI's deprecations page, 2026-05-07)."""
SHUTDOWN = dict.fromkeys(("gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "gpt-4o-2024-11-20",
                          "gpt-4.1-2025-04-14", "gpt-4.1-mini-2025-04-14"), "2027-01-14")
"""When these snapshots, and the fine-tunes built on them, stop serving: OpenAI's
deprecations page as quoted (2026-10) by several sources that also checked it against the
models endpoint's ``shutdown_date``. That field, where the API gives it, is asked first."""

def shutdown_date(backend, model: str) -> str | None:
    """When OpenAI stops serving ``model``: the models endpoint's ``shutdown_date`` where it
    gives one (asked of api.openai.com only), else :data:`SHUTDOWN`'s."""
    if urlparse(backend.base_url).hostname == "api.openai.com":
        try:
            found = backend.client.models.retrieve(model)
        except openai.OpenAIError:  # a note only: never a reason to stop
            found = None
        if found is not None and (given := getattr(found, "shutdown_date", None)):
            return str(given)
    return SHUTDOWN.get(model)


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

def _suffix(key: str) -> str:
    """The job's model-name suffix (OpenAI allows up to 64 characters)."""
    return ("semievol-" + re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-"))[:40].strip("-")


def _tag(key: str) -> str:
    """The key as a metadata value (at most 512 characters)."""
    return key if len(key) <= 512 else "sha256:" + digest(key)
