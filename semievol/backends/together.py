"""The Together backend: LoRA fine-tuning jobs on open models, chat completions with token
logprobs, embeddings, through the official ``together`` SDK (3.x), against api.together.ai
or any server that speaks its API (``semievol serve``, which speaks it on the same port as
OpenAI's).

:class:`Together` is the provider's adapter; the lifecycle it plugs into (never paying
twice, budgets, polling with events on a progress bar, error translation, keys) is
:class:`~.hosted.HostedBackend`'s, and ``TogetherBackend(...)`` builds one. What Together
adds:

* **Found again by suffix.** Together jobs carry no metadata, so the idempotency ``key``
  goes into the job's ``suffix`` as a short hash (``semievol-<16 hex>``, within Together's
  40 characters).
* **Validated before upload** with Together's own rules and limits: the SDK's file check
  (the one ``together files check`` runs) on the exact bytes to be uploaded, the model's
  limits from ``/v1/fine-tunes/models/limits`` (sequence length per example, LoRA rank,
  batch size, learning rate, epochs): see :func:`validate_training_data`. Invalid data is
  a DataError, a hyperparameter outside the limits a ConfigError.
* **Evolve continues the warm-up model**: a ``base`` that is the output of a job this
  backend made is trained further with ``from_checkpoint`` (its output model name), on the
  root model's limits and price.
* **Its own price.** Once the file is uploaded, Together's ``/v1/fine-tunes/estimate-price``
  is asked too and checked against the budget and the account's credit; the job's own
  ``total_price`` is what it cost. ``--dry-run`` asks it as well (:func:`ask_price`).

* **Served where Together serves it**: serverless where Together will, else (with
  ``--together-endpoint``) on a dedicated endpoint the run makes, pays for by the minute and
  deletes at its end; without the flag the run stops before it spends more, naming the
  hardware and its price (:mod:`.together_endpoints`).

``base_url`` is the API root: ``https://api.together.ai`` by default; a trailing ``/v1`` is
accepted and dropped (the SDK adds it to every path), so ``--base-url
http://127.0.0.1:8000/v1`` works as it does on the openai backend.

Uploads use the documented one-request ``POST /v1/files/upload`` (multipart). The SDK's
``files.upload`` helper instead goes through a presigned-URL redirect that the official API
description does not describe and that would not reach a local server.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import together
from together.lib.utils.files import check_file
from together.types import FileResponse

from .. import cost
from ..chatfile import example_problem
from ..errors import BackendError, ConfigError, DataError
from ..rundir import digest
from ..types import ChatExample, Generation, Message, Usage
from .hosted import HostedBackend, jsonl, whole_epochs
from .provider import Event, Job, Plan, TrainingStats
from .together_endpoints import Endpoints

log = logging.getLogger("semievol")

__all__ = ["TogetherBackend", "Together", "validate_training_data", "ask_price",
           "DEFAULT_MODEL", "DEFAULT_EMBED_MODEL"]

DEFAULT_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct-Reference"
"""The paper's own model, in the form Together fine-tunes."""
DEFAULT_EMBED_MODEL = "BAAI/bge-base-en-v1.5"

EMBED_MAX_INPUTS = 256
EMBED_MAX_TOKENS = 100_000
"""Per embeddings request. Together documents no batch limit; these keep each request well
inside what its serverless embedding models take."""

SUFFIX_PREFIX = "semievol-"
ROLES = frozenset({"system", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "weight"})
"""Together's conversational training format (docs: fine-tuning data preparation)."""


def TogetherBackend(model: str | None = None, *, endpoint: str | None = None,
                    **options) -> HostedBackend:
    """The Backend protocol over the Together API: ``HostedBackend(Together(endpoint),
    model, **options)`` (the options are :class:`~.hosted.HostedBackend`'s; ``endpoint``:
    see :class:`Together`). Call its ``close()`` when done: it deletes the dedicated
    endpoints it made."""
    return HostedBackend(Together(endpoint), model, **options)


class Together:
    """The Together API as a :class:`~.provider.Provider` (see the module docstring)."""

    name, title, key_env = "together", "Together", "TOGETHER_API_KEY"
    sdk, sdk_error = together, together.TogetherError
    default_model, default_embed_model = DEFAULT_MODEL, DEFAULT_EMBED_MODEL
    min_finetune_examples = 1
    """Together's own minimum (``together.lib.constants.MIN_SAMPLES``)."""
    prices = cost.TOGETHER_PRICE_LIST
    embed_limits = (EMBED_MAX_INPUTS, EMBED_MAX_TOKENS)
    succeeded, failed = "completed", frozenset({"error", "cancelled", "user_error"})
    output_field = "output"

    def __init__(self, endpoint: str | None = None):
        """``endpoint``: the hardware of a dedicated endpoint for a fine-tune Together will
        not serve serverless (``auto``: the cheapest available); None stops the run there."""
        self._limits: dict[str, object] = {}
        self.endpoints = Endpoints(endpoint)

    def connect(self, *, base_url: str | None, **options):
        if base_url:
            base_url = re.sub(r"/v1/?$", "", base_url.rstrip("/"))
        return together.Together(base_url=base_url, **options)

    def batches(self, backend):
        return None

    def quote(self, task, config, *, base_url: str | None, api_key: str | None) -> str:
        """``--dry-run``'s line on Together's own estimate (:func:`ask_price`)."""
        return ask_price(task, config, base_url=base_url, api_key=api_key)

    # -- fine-tuning jobs ----------------------------------------------------------------
    def prepare(self, backend, base: str, examples: Sequence[ChatExample], config, *,
                epochs: int, key: str) -> Plan:
        made = backend.made(base)
        root, start = (made["root"], {"from_checkpoint": base}) if made \
            else (base, {"model": base})
        limits = self.model_limits(backend, root)
        data = jsonl({"messages": list(ex)} for ex in examples)
        stats = validate_training_data(examples, root, config, limits, data=data)
        return Plan(data, stats, root, {**start, **_request(config, epochs),
                                        "suffix": _suffix(key), "model_limits": limits})

    def model_limits(self, backend, model: str):
        if model not in self._limits:
            with backend.errors(f"reading the fine-tuning limits of {model}"):
                self._limits[model] = backend.client.fine_tuning.model_limits(model_name=model)
        return self._limits[model]

    def upload(self, backend, name: str, data: bytes) -> str:
        return backend.client.post(
            "/v1/files/upload", cast_to=FileResponse,
            body={"purpose": "fine-tune", "file_name": name, "file_type": "jsonl"},
            files=[("file", (name, data, "application/octet-stream"))],
            options={"headers": {"Content-Type": "multipart/form-data"}}).id

    def create(self, backend, plan: Plan, record: dict) -> Job:
        """The job, once Together's own estimate is within the budget and the credit."""
        base = plan.request.get("from_checkpoint") or plan.request["model"]
        self.check_estimate(backend, self.estimate(backend, record["file_id"], plan.request),
                            base)
        return self._create_once(backend, record, lambda client: client.fine_tuning.create(
            training_file=record["file_id"], **plan.request, **wandb_settings(backend)))

    def _create_once(self, backend, record: dict, create) -> Job:
        """``create`` without the SDK's own retries: Together takes no idempotency key, so
        a retry after a lost answer would make (and bill) a second job. After a failure that
        may have made one, the job is looked for by the step's suffix before trying again."""
        client, tries = backend.client.with_options(max_retries=0), backend.client.max_retries
        for attempt in itertools.count():
            try:
                return _job(create(client))
            except (together.APIConnectionError, together.RateLimitError,
                    together.InternalServerError):
                if attempt == tries:
                    raise
            job = backend.find_job(record)
            if job is not None:
                return job
            time.sleep(min(8.0, 0.5 * 2 ** attempt))

    def estimate(self, backend, file_id: str, request: dict):
        """Together's own estimate of the job ``request`` describes, or None when it gives
        none."""
        with backend.errors("asking Together to estimate the fine-tuning price"):
            estimate = backend.client.fine_tuning.estimate_price(
                training_file=file_id, n_epochs=request["n_epochs"],
                **{k: request[k] for k in ("model", "from_checkpoint") if k in request},
                training_type={"type": "Lora", "lora_r": request["lora_r"],
                               "lora_alpha": request["lora_alpha"],
                               "lora_dropout": request["lora_dropout"],
                               "lora_trainable_modules": "all-linear"},
                training_method={"method": "sft", "train_on_inputs": False})
        return estimate if getattr(estimate, "estimation_available", False) else None

    def check_estimate(self, backend, estimate, base: str) -> None:
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
        backend.budget.check(f"fine-tuning {base} (Together's estimate)",
                             estimate.estimated_total_price)

    def retrieve(self, backend, job_id: str) -> Job:
        return _job(backend.client.fine_tuning.retrieve(job_id))

    def find(self, backend, key: str) -> list[Job]:
        suffix = _suffix(key)
        return [_job(job) for job in backend.client.fine_tuning.list().data
                if job.suffix == suffix or suffix in (_output_name(job) or "")]

    def events(self, backend, job_id: str) -> list[Event]:
        return [Event((e.created_at, e.message, e.type), e.message, e.step, e.total_steps,
                      e.level in ("error", "legacy_ierror") or e.type == "job_error")
                for e in backend.client.fine_tuning.list_events(job_id).data]

    # -- generation and embeddings --------------------------------------------------------
    def chat_body(self, model: str, messages: list[Message], *, n: int, temperature: float,
                  max_tokens: int, seed: int | None) -> dict:
        """``logprobs=1``: an integer on Together."""
        return dict(model=model, messages=[dict(m) for m in messages], n=n,
                    temperature=temperature, max_tokens=max_tokens, logprobs=1,
                    **({"seed": seed} if seed is not None else {}))

    def generation(self, choice, model: str) -> Generation:
        """Tokens and logprobs from ``choice.logprobs.tokens`` / ``token_logprobs``."""
        text = (choice.message.content if choice.message else choice.text) or ""
        part = choice.logprobs
        tokens, logprobs = (part.tokens or [], part.token_logprobs or []) if part else ([], [])
        if text and not logprobs or len(tokens) != len(logprobs):
            raise BackendError(f"{model} returned no usable token logprobs "
                               "(the server must support integer logprobs)")
        return Generation(text=text, tokens=tuple(tokens), logprobs=tuple(logprobs),
                          finish_reason="length" if choice.finish_reason == "length" else "stop")

    def embed_body(self, model: str, texts: list[str]) -> dict:
        return {"model": model, "input": texts}

    # -- serving fine-tunes (see together_endpoints.py) ---------------------------------------
    def route(self, backend, model: str) -> tuple[str, Usage]:
        """The name to chat with ``model`` under, and what serving it cost since last asked."""
        return self.endpoints.route(backend, model)

    def close(self, backend) -> None:
        """Delete the dedicated endpoints this run made."""
        self.endpoints.close(backend)


def _request(config, epochs: int) -> dict:
    """A LoRA job's hyperparameters from FinetuneConfig (the loss on the answers only)."""
    return dict(n_epochs=epochs, batch_size=config.batch_size,
                learning_rate=config.learning_rate,
                lr_scheduler_type="linear" if config.lr_scheduler == "linear" else "cosine",
                warmup_ratio=config.warmup_ratio, lora=True, lora_r=config.lora_rank,
                lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                train_on_inputs=False, random_seed=config.seed)


def _job(job) -> Job:
    return Job(job.id, job.status, _output_name(job), job.training_file, job.created_at,
               base=job.from_checkpoint or job.model, root=job.model,
               trained_tokens=job.token_count or 0,
               billed_usd=job.total_price / 1e9 if job.total_price else None)


def ask_price(task, config, *, base_url: str | None, api_key: str | None,
              timeout: float = 5.0) -> str:
    """One line for ``semievol run --backend together --dry-run``: Together's own estimate
    of the warm-up fine-tune, asked of ``/v1/fine-tunes/estimate-price`` with a short
    timeout and no retries (the estimate needs an uploaded file, so the file is uploaded; no
    job is created); where the API cannot be reached (offline) or no key is set, a line
    saying the table's estimate stands."""
    from .. import prompts

    try:
        backend = TogetherBackend(config.model, base_url=base_url, api_key=api_key,
                                  timeout=timeout, max_retries=0, quiet=True)
        data = jsonl({"messages": list(prompts.training_example(e, e.answer,
                                                                config.prompt_style))}
                     for e in task.labeled)
        with backend.errors("uploading the training file"):
            file_id = backend.api.upload(backend, "semievol-estimate.jsonl", data)
        request = {"model": backend.default_model,
                   **_request(config.finetune, whole_epochs(config.finetune.epochs, "Together"))}
        estimate = backend.api.estimate(backend, file_id, request)
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


def wandb_settings(backend) -> dict:
    """With ``--report-to wandb``, Together logs the job's training to W&B itself: the
    job takes the W&B settings from this environment (``WANDB_API_KEY``, ``WANDB_PROJECT``,
    ``WANDB_ENTITY``, ``WANDB_BASE_URL``). They go in the request only, never into a
    record of the run (the key is a secret)."""
    if "wandb" not in backend.report_to:
        return {}
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        log.warning("--report-to wandb: WANDB_API_KEY is not set, so Together's jobs do "
                    "not log to W&B (semievol still logs the run's own metrics)")
        return {}
    settings = {"wandb_api_key": key,
                "wandb_project_name": os.environ.get("WANDB_PROJECT", "semievol"),
                "wandb_entity": os.environ.get("WANDB_ENTITY"),
                "wandb_base_url": os.environ.get("WANDB_BASE_URL")}
    return {k: v for k, v in settings.items() if v}


def _suffix(key: str) -> str:
    """The job's suffix: a hash of the key, found again by it (Together: 40 characters)."""
    return SUFFIX_PREFIX + digest(key)[:16]


def _output_name(job) -> str | None:
    """The model a job makes (``model_output_name``, under whichever alias the SDK type
    gives it)."""
    return job.to_dict().get("model_output_name") or getattr(job, "output_name", None)
