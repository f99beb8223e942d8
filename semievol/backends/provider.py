"""What a hosted provider's adapter is: the :class:`Provider` protocol that
:class:`~.hosted.HostedBackend` drives, and the records an adapter hands back to it
(:class:`Job`, :class:`Event`, :class:`Plan`, :class:`TrainingStats`), whatever the
provider calls its fields. An adapter (``openai.py``, ``together.py``) is a plain class
that implements these methods; nothing inherits from anything.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

from .. import cost
from ..types import ChatExample, Generation, Message


@dataclass(frozen=True)
class Job:
    """A fine-tuning job as the lifecycle sees it, whatever the provider calls its fields."""

    id: str
    status: str
    """The provider's own word ("validating_files", "completed"...), as recorded."""
    output: str | None
    """The model the job made, once it has."""
    file_id: str | None
    created_at: object
    """Sortable: the newest of several jobs for one key wins."""
    base: str
    """The model it trains from."""
    root: str
    """The base model at the root of a chain of fine-tunes: its limits and price."""
    trained_tokens: int = 0
    billed_usd: float | None = None
    """What the provider says the job cost, where it says (else the price list's)."""
    error: str | None = None
    """Why it failed, where the job itself says."""


@dataclass(frozen=True)
class Event:
    """One event of a job, for the progress bar."""

    mark: object
    """Tells events apart (seen once each)."""
    message: str
    step: int | None = None
    total: int | None = None
    error: bool = False
    """An error event: the last one is the failure's reason where the job gives none."""


@dataclass(frozen=True)
class Plan:
    """A fine-tune validated and ready to upload (the adapter's ``prepare``)."""

    data: bytes
    """The training file, as it will be uploaded."""
    stats: TrainingStats
    root: str
    """What the trained tokens are priced as (see :attr:`Job.root`)."""
    request: dict
    """The provider's own arguments for creating the job (all but the file)."""



@dataclass(frozen=True)
class TrainingStats:
    """What validated training data amounts to."""

    n_examples: int
    total_tokens: int
    """Tokens in the training file; providers bill this x epochs."""
    max_tokens: int
    """The longest example."""



class Provider(Protocol):
    """One hosted API, as :class:`~.hosted.HostedBackend` drives it. Adapters are plain
    classes (one instance per backend); each method gets the backend (``backend``), for its
    ``client`` (made by ``connect``), ``records``, ``budget`` and
    :meth:`~.hosted.HostedBackend.errors`. The backend translates the errors of ``upload``,
    ``create``, ``retrieve``, ``find``, ``events`` and of its own chat and embeddings
    requests; other API calls an adapter makes go through ``backend.errors(what)``. An
    adapter may add ``quote(task, config, *, base_url, api_key)``: a line of the provider's
    own estimate for ``--dry-run``."""

    name: str
    """The backend's name ("openai"), its key in :mod:`.registry`."""
    title: str
    """How messages name the provider ("OpenAI")."""
    key_env: str
    """The environment variable the API key is read from."""
    sdk: ModuleType
    """The SDK module whose exception classes :meth:`~.hosted.HostedBackend.errors` translates;
    ``sdk_error`` is its root exception."""
    sdk_error: type[Exception]
    default_model: str
    default_embed_model: str
    """Embeddings on the provider's own API (with a ``base_url``, the served model)."""
    min_finetune_examples: int
    prices: cost.PriceList
    """Its dated price list (overridable per backend with ``prices``)."""
    embed_limits: tuple[int, int]
    """Texts and tokens per embeddings request."""
    succeeded: str
    """The status of a job that made its model; ``failed``: those that never will."""
    failed: frozenset[str]
    output_field: str
    """The job record's field for the model a job made (as earlier versions wrote it, so
    their run directories resume)."""

    def connect(self, *, api_key: str, base_url: str | None, timeout: float,
                max_retries: int, http_client): ...

    def prepare(self, backend, base: str, examples: Sequence[ChatExample], config, *,
                epochs: int, key: str) -> Plan:
        """Validate a fine-tune as the provider would, before anything is uploaded."""

    def upload(self, backend, name: str, data: bytes) -> str:
        """Upload a training file; its id."""

    def create(self, backend, plan: Plan, record: dict) -> Job:
        """Create the job on ``record["file_id"]``; ``record["attempt"]`` counts reruns
        after failures."""

    def retrieve(self, backend, job_id: str) -> Job: ...

    def find(self, backend, key: str) -> list[Job]:
        """The account's jobs that carry ``key``, whatever their status."""

    def events(self, backend, job_id: str) -> list[Event]:
        """The job's events, oldest first."""

    def chat_body(self, model: str, messages: list[Message], *, n: int, temperature: float,
                  max_tokens: int, seed: int | None) -> dict:
        """A chat completion request asking for ``n`` choices with token logprobs."""

    def generation(self, choice, model: str) -> Generation:
        """One choice of a completion, with its tokens' logprobs (BackendError without)."""

    def embed_body(self, model: str, texts: list[str]) -> dict: ...

    def batches(self, backend):
        """The provider's batch API (``generate(bodies)``), or None."""

    # Optional, where a provider may not serve a fine-tune as it serves its base model:
    # ``route(backend, model) -> (name, usage)``: the name chat requests for ``model`` go
    # to, and what keeping it served has cost since the last call (Together: a dedicated
    # endpoint billed by the minute); ``close(backend)``: release what a run holds.

