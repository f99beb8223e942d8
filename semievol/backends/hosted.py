"""The hosted-API backends' one lifecycle: :class:`HostedBackend` implements the Backend
protocol over any provider's job API, and each provider (``openai.py``, ``together.py``) is
a small adapter (:class:`~.provider.Provider`) it is built with: composition, no base
classes. Adding a provider is one adapter module (with its dated price list) and one entry
in :mod:`.registry`. Beside this module: what an adapter is (:mod:`.provider`), what calls
cost (:mod:`.spending`), and the one translation of SDK errors (:mod:`.api_errors`).

What every hosted backend promises, written here once:

* **Never pay twice.** A fine-tune is found again by its idempotency ``key``: first in the
  record ``workdir/jobs/<slug>.json`` (written atomically the moment the file id and the job
  id exist), then among the account's jobs that carry the key (the adapter's ``find``:
  OpenAI's metadata, Together's suffix). A job that succeeded is reused, one still going is
  waited on, and only when neither exists is a file uploaded and a job created. Failed or
  cancelled jobs are left behind: a rerun is a deliberate new attempt (``attempt``).
* **Validated and priced before anything is uploaded** (the adapter's ``prepare``), each
  step checked against ``max_cost_usd``; each call's result carries what the API reported
  it used (``.usage``), and their running total (``spending``) feeds the budget.
* **Polled** with tenacity, backing off; the job's events on a progress bar on stderr.
* **The API key** comes from the argument or the provider's variable and lives only inside
  the SDK client: never in the workdir, a log line or an error message. A server on
  loopback (``semievol serve`` without ``--api-key``) needs none: :data:`LOCAL_API_KEY`.
* **Faults.** The SDK retries connection errors and 408/409/429/5xx ``max_retries`` times
  (honouring Retry-After), each request limited to ``timeout`` seconds. What still fails is
  translated in :meth:`HostedBackend.errors` only (:func:`~.api_errors.sdk_errors`, whose
  docstring draws the SDK's part of the tree); every step resumes when run again::

      the SDK's errors ────────────────────────────────> BackendError, ConfigError
      job failed or cancelled ─────────────────────────> FinetuneFailed (the job's reason)
      job still running after max_wait ────────────────> BackendError (run again to resume)
      a step that would pass max_cost_usd ─────────────> BudgetExceeded
      no API key, fractional epochs ───────────────────> ConfigError

  Adapters add their own: invalid training data is a DataError, a hyperparameter outside
  the provider's limits a ConfigError, OpenAI's closed fine-tuning a BackendError that
  names the other backends.
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from tenacity import Retrying, retry_if_result, stop_after_delay, stop_never, wait_exponential
from tqdm.auto import tqdm

from .. import cost
from ..errors import BackendError, ConfigError, FinetuneFailed
from ..rundir import atomic_write_json, slug
from ..types import ChatExample, Embeddings, Generation, Generations, Message, ModelRef, Usage
from .api_errors import scrub, sdk_errors, server_message
from .provider import Event, Job, Plan, Provider, TrainingStats
from .spending import Spending, check_priced, embed_in_batches, normalised, request_batches

__all__ = [
    "HostedBackend", "Records", "LOCAL_API_KEY", "poll", "whole_epochs", "jsonl",
    "resolve_key", "api_runtime", "is_loopback", "say",
    # the names beside this module, still importable from here as before they moved
    "Event", "Job", "Plan", "Provider", "TrainingStats",
    "scrub", "sdk_errors", "server_message",
    "Spending", "check_priced", "embed_in_batches", "normalised", "request_batches"]

LOCAL_API_KEY = "semievol-local"
"""What the SDK is given as key for a loopback server when no key is set."""


class HostedBackend:
    """The Backend protocol over a hosted API; ``api`` is the provider's adapter (see the
    module docstring). ``OpenAIBackend(...)`` and ``TogetherBackend(...)`` build one."""

    def __init__(self, api: Provider, model: str | None = None, *,
                 base_url: str | None = None, api_key: str | None = None,
                 workdir: str | Path | None = None, max_concurrency: int = 8,
                 batch_mode: bool = False, prices: dict | None = None,
                 max_cost_usd: float | None = None, spent_usd: float = 0.0,
                 embed_model: str | None = None, timeout: float = 60.0, max_retries: int = 5,
                 poll_interval: float = 5.0, max_wait: float | None = None,
                 quiet: bool = False, http_client=None, extra_body: dict | None = None,
                 report_to: tuple[str, ...] = ()):
        """
        ``workdir``: where job and batch records are kept (the run directory's own folder);
        None keeps none, and only the API's job list protects against paying twice.
        ``embed_model``: None means the provider's, or with a ``base_url`` the served model
        itself (``semievol serve`` embeds with its model). ``max_concurrency``: chat
        requests in flight at once. ``batch_mode``: generate through the provider's batch
        API (OpenAI's: half price, results within 24 h). ``prices``: overrides of the
        provider's price list. ``max_cost_usd``: stop before a step that would take
        spending past it, counting ``spent_usd`` (an earlier part of a resumed run).
        ``timeout``: seconds per HTTP request; ``max_retries``: the SDK's retries per
        request. ``poll_interval``: first wait between polls (backing off to 12x).
        ``max_wait``: give up waiting on a job or batch after this many seconds (None: wait
        as long as it takes); a rerun resumes waiting on it. ``http_client``: the SDK's HTTP
        client (proxies, test transports). ``quiet``: no progress on stderr.
        ``extra_body``: fields added to every chat request (not in batch mode), beyond the
        API's own: vLLM's ``top_k``, ``min_p``... ``report_to``: the run's experiment
        trackers, for a provider that logs its jobs to one itself (Together to W&B).
        """
        self.api = api
        self.name = api.name
        self.min_finetune_examples = api.min_finetune_examples
        self.default_model = model or api.default_model
        self.embed_model = embed_model or (self.default_model if base_url
                                           else api.default_embed_model)
        self.records = Records(workdir)
        self.max_concurrency = max_concurrency
        self.batch_mode = batch_mode
        self.prices = cost.price_table(prices, api.prices.table)
        self.poll_interval = poll_interval
        self.max_wait = max_wait
        self.quiet = quiet
        self.extra_body = extra_body
        self.report_to = tuple(report_to)
        if max_cost_usd is not None:
            check_priced(self.prices, api.title, self.default_model, self.embed_model)
        self.spending = Spending(max_cost_usd, spent_usd)
        self.budget = self.spending.budget
        self._secret = key = resolve_key(api_key, api, base_url)
        self.client = api.connect(api_key=key, base_url=base_url, timeout=timeout,
                                  max_retries=max_retries, http_client=http_client)
        self.batches = api.batches(self)
        """The provider's batch API, or None."""
        if batch_mode and self.batches is None:
            raise ConfigError(f"{api.title} has no batch API here: drop --openai-batch")

    def __repr__(self) -> str:
        return f"HostedBackend({self.name}, model={self.default_model!r}, " \
               f"base_url={self.base_url!r})"

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    # -- fine-tuning --------------------------------------------------------------------
    def finetune(self, base: str, examples: Sequence[ChatExample], config, *,
                 key: str) -> ModelRef:
        """A job on ``base`` (a model, or one fine-tuned earlier, to continue training);
        returns the model it made. Reuses or resumes the job of ``key``."""
        epochs = whole_epochs(config.epochs, self.api.title)
        record = self.records.read("jobs", key) or {"key": key}
        job = self.find_job(record)
        if job is None:
            plan = self.api.prepare(self, base, examples, config, epochs=epochs, key=key)
            stats = plan.stats
            trained = stats.total_tokens * epochs
            estimate = cost.training_cost(plan.root, trained, prices=self.prices)
            self.say(f"fine-tuning {base}: {stats.n_examples} examples, {stats.total_tokens:,}"
                     f" tokens x {epochs} epochs = {trained:,} trained tokens"
                     + (f", about {cost.format_usd(estimate)}" if estimate is not None else ""))
            self.budget.check(f"fine-tuning {base} on {stats.n_examples} examples", estimate)
            if not record.get("file_id"):
                with self.errors("uploading the training file"):
                    record["file_id"] = self.api.upload(self, f"{slug(key)}.jsonl", plan.data)
                self.records.write("jobs", key, record)
            with self.errors("creating the fine-tuning job"):
                job = self.api.create(self, plan, record)
            record.update(job_id=job.id, status=job.status, base=base, root=plan.root,
                          examples=stats.n_examples, training_tokens=stats.total_tokens)
            self.records.write("jobs", key, record)
            self.say(f"fine-tuning job {job.id} created ({job.status})")
        job = self._wait_for_job(job, record)
        usd = job.billed_usd if job.billed_usd is not None else cost.training_cost(
            record.get("root") or job.root, job.trained_tokens, prices=self.prices)
        return ModelRef(job.output, self.spending.add(Usage(trained_tokens=job.trained_tokens,
                                                            cost_usd=usd)))

    def find_job(self, record: dict) -> Job | None:
        """The job already made for this key, if it succeeded or is still going: the one in
        the record, else one the API lists for the key. A failed one is left behind (a
        rerun is a new attempt, with a fresh upload)."""
        if record.get("job_id"):
            with self.errors("looking up the recorded fine-tuning job"):
                job = self.api.retrieve(self, record["job_id"])
            if job.status not in self.api.failed:
                self.say(f"resuming fine-tuning job {job.id} ({job.status})")
                return job
            record.update(job_id=None, file_id=None, status=job.status,
                          attempt=record.get("attempt", 0) + 1)
        with self.errors("listing fine-tuning jobs"):
            found = [job for job in self.api.find(self, record["key"])
                     if job.status not in self.api.failed]
        if not found:
            return None
        job = max(found, key=lambda j: (j.status == self.api.succeeded, j.created_at))
        record.update(job_id=job.id, file_id=job.file_id, status=job.status,
                      base=record.get("base") or job.base, root=record.get("root") or job.root)
        self.records.write("jobs", record["key"], record)
        self.say(f"found fine-tuning job {job.id} ({job.status}) for this step; not creating "
                 "another")
        return job

    def _wait_for_job(self, job: Job, record: dict) -> Job:
        """Poll until the job is done, its events on a progress bar; the job that made its
        model, or FinetuneFailed with the job's own reason (else its last error event)."""
        api, seen, errors = self.api, set(), []
        done = lambda j: j.status == api.succeeded or j.status in api.failed  # noqa: E731
        bar = tqdm(desc=f"fine-tune {job.id}", unit="step", disable=self.quiet,
                   file=sys.stderr, leave=False)

        def fetch() -> Job:
            with self.errors(f"checking fine-tuning job {job.id}"):
                current = api.retrieve(self, job.id)
                events = api.events(self, job.id)
            for event in events:
                if event.mark in seen:
                    continue
                seen.add(event.mark)
                bar.set_postfix_str(f"{current.status}: {event.message}"[:80])
                if event.error:
                    errors.append(event.message)
                if event.total:
                    bar.total = event.total
                if event.step:
                    bar.update(max(0, event.step - bar.n))
            if current.status != record.get("status"):
                record.update(status=current.status, **{api.output_field: current.output})
                self.records.write("jobs", record["key"], record)
            return current

        try:
            job = fetch() if done(job) else self.poll(fetch, done)
        finally:
            bar.close()
        if not done(job):
            raise BackendError(
                f"fine-tuning job {job.id} is still {job.status} after {self.max_wait:g} s; "
                "run again to resume waiting on it (no second job is created)")
        record.update(status=job.status, **{api.output_field: job.output})
        self.records.write("jobs", record["key"], record)
        if job.status != api.succeeded:
            reason = job.error or (errors[-1] if errors else "no reason given")
            raise FinetuneFailed(f"fine-tuning job {job.id} {job.status}: {self.scrub(reason)}")
        if not job.output:
            raise BackendError(f"fine-tuning job {job.id} {job.status} without an output model")
        self.say(f"fine-tuning job {job.id} {job.status}: {job.output}")
        return job

    def made(self, model: str) -> dict | None:
        """The record of the job here that made ``model``, if one did."""
        return next((r for r in self.records.all("jobs")
                     if r.get(self.api.output_field) == model and r.get("root")), None)

    # -- generation ---------------------------------------------------------------------
    def generate_with_logprobs(self, model: str, prompts: Sequence[list[Message]], *,
                               n: int = 1, temperature: float = 0.0, max_tokens: int = 64,
                               seed: int | None = None) -> Generations:
        """One chat completion per prompt with ``n`` choices and token logprobs (the prompt
        is billed once, not n times); ``max_concurrency`` requests at a time, or through the
        batch API in batch mode."""
        record = self.made(model)
        target, serving = self.route(model)
        priced = target if target != model else f"ft:{record['root']}" if record else model
        if self.budget.limit_usd is not None:
            prompt_tokens = sum(cost.count_chat_tokens(p, priced) for p in prompts)
            self.budget.check(
                f"generating {n} x {len(prompts)} responses with {model}",
                cost.chat_cost(priced, prompt_tokens, len(prompts) * n * max_tokens,
                               batch=self.batch_mode, prices=self.prices))
        bodies = [self.api.chat_body(target, p, n=n, temperature=temperature,
                                     max_tokens=max_tokens, seed=seed) for p in prompts]
        if self.batch_mode:
            answers = self.batches.generate(bodies)
        else:
            def chat(body: dict):
                with self.errors(f"chat completion with {body['model']}"):
                    completion = self.client.chat.completions.create(
                        **body, extra_body=self.extra_body)
                return self.generations(completion, body, priced=priced)

            with ThreadPoolExecutor(self.max_concurrency) as pool:
                answers = list(pool.map(chat, bodies))
        out = Generations.of(answers)
        out.usage += serving
        return out

    def route(self, model: str) -> tuple[str, Usage]:
        """Where chat requests for ``model`` go, and what serving it there has cost since
        last asked (counted in the budget): ``model`` itself at no extra cost, unless the
        provider routes it (see :class:`Provider`)."""
        route = getattr(self.api, "route", None)
        if route is None:
            return model, Usage()
        target, usage = route(self, model)
        return target, self.spending.add(usage)

    def close(self) -> None:
        """Release what this backend holds on the provider (Together: the dedicated
        endpoints it made). ``semievol run`` calls it at the end, however the run ends."""
        close = getattr(self.api, "close", None)
        if close is not None:
            close(self)

    def generations(self, completion, body: dict, *, priced: str | None = None,
                    batch: bool = False) -> tuple[list[Generation], Usage]:
        """The n choices of a completion as Generations, and what it used (counted in the
        budget's total), priced as ``priced`` (default: the model asked)."""
        used = Usage()
        if (usage := completion.usage) is not None:
            details = getattr(usage, "prompt_tokens_details", None)
            cached = (getattr(details, "cached_tokens", 0) or 0) if details else 0
            used.add(prompt=usage.prompt_tokens, completion=usage.completion_tokens,
                     cost=cost.chat_cost(priced or body["model"], usage.prompt_tokens,
                                         usage.completion_tokens, cached_tokens=cached,
                                         batch=batch, prices=self.prices))
        self.spending.add(used)
        choices = sorted(completion.choices, key=lambda c: c.index or 0)
        if len(choices) != body["n"]:
            raise BackendError(f"asked {completion.model or body['model']} for {body['n']} "
                               f"samples, the server returned {len(choices)} choices")
        return [self.api.generation(c, body["model"]) for c in choices], used

    # -- embeddings ---------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> Embeddings:
        """L2-normalised embeddings with ``embed_model``, in requests within the provider's
        ``embed_limits``."""

        def request(batch: list[str]):
            with self.errors(f"embedding with {self.embed_model}"):
                return self.client.embeddings.create(**self.api.embed_body(self.embed_model,
                                                                           batch))

        max_inputs, max_tokens = self.api.embed_limits
        return embed_in_batches(texts, request, model=self.embed_model, prices=self.prices,
                                spending=self.spending, max_inputs=max_inputs,
                                max_tokens=max_tokens)

    def runtime(self) -> dict:
        return api_runtime()

    # -- plumbing -----------------------------------------------------------------------
    @contextmanager
    def errors(self, what: str):
        """The one place the SDK's errors become semievol's (see the module docstring)."""
        with sdk_errors(self.api.sdk, what, where=self.base_url,
                        retries=self.client.max_retries, timeout=self.client.timeout,
                        secret=self._secret, key_env=self.api.key_env, base=self.api.sdk_error):
            yield

    def poll(self, fetch: Callable, done: Callable):
        """Poll every poll_interval, backing off, for at most max_wait seconds."""
        return poll(fetch, done, interval=self.poll_interval, max_wait=self.max_wait)

    def say(self, message: str) -> None:
        say(message, quiet=self.quiet)

    def scrub(self, text: str) -> str:
        """``text`` without the API key."""
        return scrub(text, self._secret)


class Records:
    """JSON records under ``workdir/<kind>/<slug of key>.json`` (``jobs``, ``batches``),
    each written whole and atomically, so a kill never leaves half a record. A ``workdir``
    of None keeps none (every read finds nothing)."""

    def __init__(self, workdir: str | Path | None):
        self.workdir = Path(workdir) if workdir is not None else None

    def path(self, kind: str, key: str) -> Path | None:
        return None if self.workdir is None else self.workdir / kind / f"{slug(key)}.json"

    def read(self, kind: str, key: str) -> dict | None:
        path = self.path(kind, key)
        return json.loads(path.read_text()) if path is not None and path.exists() else None

    def write(self, kind: str, key: str, record: dict) -> None:
        path = self.path(kind, key)
        if path is not None:
            atomic_write_json(path, record)

    def all(self, kind: str) -> list[dict]:
        """Every record of a kind (for lookups by something other than the key)."""
        if self.workdir is None or not (self.workdir / kind).is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted((self.workdir / kind).glob("*.json"))]


def poll(fetch: Callable, done: Callable, *, interval: float, max_wait: float | None):
    """Call ``fetch`` until ``done(result)``, waiting ``interval`` seconds, backing off to 12x
    that; after ``max_wait`` seconds (None: never) return the last result, done or not."""
    retrying = Retrying(
        retry=retry_if_result(lambda result: not done(result)),
        wait=wait_exponential(multiplier=interval, min=interval, max=12 * interval),
        stop=stop_after_delay(max_wait) if max_wait is not None else stop_never,
        retry_error_callback=lambda state: state.outcome.result())
    return retrying(fetch)


def whole_epochs(epochs: float, provider: str) -> int:
    if epochs != int(epochs):
        raise ConfigError(f"{provider} fine-tuning takes a whole number of epochs, not {epochs}")
    return int(epochs)


def jsonl(rows: Iterable) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
                   for row in rows).encode()


def resolve_key(given: str | None, api, base_url: str | None) -> str:
    """The API key: ``given``, else the provider's variable (``api.key_env``), else, for a
    server on loopback, ``api.local_key`` (default :data:`LOCAL_API_KEY`); otherwise a
    ConfigError that names the variable. It is never written anywhere."""
    key = given or os.environ.get(api.key_env)
    if key:
        return key
    if base_url and is_loopback(base_url):
        return getattr(api, "local_key", LOCAL_API_KEY)
    raise ConfigError(f"no {api.title} API key: set {api.key_env} (or pass --api-key)")


def api_runtime() -> dict:
    """A hosted API's ``runtime()``: its devices and number types are not known here."""
    from . import library_versions

    return {"world_size": 1, "device": "remote", "dtype": "unknown",
            "generation_engine": "api", "versions": library_versions()}


def is_loopback(address: str) -> bool:
    """Whether a URL or a host name points at this machine."""
    host = (urlparse(address).hostname or "") if "://" in address else address
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def say(message: str, *, quiet: bool) -> None:
    """A progress line on stderr (jobs take minutes to hours: people want to see them)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


