"""What the two hosted-API backends (``openai``, ``together``) share, in one home: the job
records that keep a crashed run from paying twice, polling with tenacity, the translation of
SDK errors into semievol's, and the small pure helpers (digests, file names, JSONL, request
batches, normalised embedding rows).

Nothing here imports a provider SDK: both SDKs are generated from the same template and
raise the same exception classes, each from its own module, which is passed in.
"""
from __future__ import annotations

import ipaddress
import json
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from tenacity import Retrying, retry_if_result, stop_after_delay, stop_never, wait_exponential

from .. import cost
from ..errors import BackendError, ConfigError
from ..rundir import atomic_write_json, slug
from ..types import Embeddings, Usage


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


class Spending:
    """A hosted backend's running total of what its calls used, and the budget that reads
    it. Calls run in threads, hence the lock. Each call also hands its own usage back with
    its result; this total is only for the budget (and for people)."""

    def __init__(self, limit_usd: float | None, spent_usd: float = 0.0):
        self.total = Usage(cost_usd=spent_usd or None)
        """Starts at what a resumed run spent before (``spent_usd``), so the budget covers
        the whole run."""
        self.budget = cost.Budget(limit_usd, self.total)
        self._lock = threading.Lock()

    def add(self, usage: Usage) -> Usage:
        """Count ``usage`` in the total; return it."""
        with self._lock:
            self.total += usage
        return usage


def embed_in_batches(texts: Sequence[str], request: Callable, *, model: str, prices,
                     spending: Spending, max_inputs: int, max_tokens: int) -> Embeddings:
    """Embed ``texts`` with ``model`` in requests of at most ``max_inputs`` texts and
    ``max_tokens`` tokens (counted here), once the budget allows the whole call.
    ``request(texts)`` sends one request and returns the SDK's response; its
    ``usage.prompt_tokens`` counts where the API reports it, else the count made here."""
    counts = [cost.count_tokens(t, model) for t in texts]
    spending.budget.check(f"embedding {len(texts)} texts with {model}",
                          cost.embedding_cost(model, sum(counts), prices=prices))
    rows: list[list[float]] = []
    usage = Usage()
    for start, stop in request_batches(counts, max_inputs=max_inputs, max_tokens=max_tokens):
        response = request(list(texts[start:stop]))
        reported = getattr(response, "usage", None)  # an object, a dict (together) or None
        if isinstance(reported, dict):
            reported = reported.get("prompt_tokens")
        elif reported is not None:
            reported = reported.prompt_tokens
        tokens = reported or sum(counts[start:stop])
        usage.add(prompt=tokens, cost=cost.embedding_cost(model, tokens, prices=prices))
        if len(response.data) != stop - start:
            raise BackendError(f"sent {stop - start} texts to embed, {model} returned "
                               f"{len(response.data)} embeddings")
        rows.extend(d.embedding for d in sorted(response.data, key=lambda d: d.index))
    spending.add(usage)
    return Embeddings(normalised(rows) if rows else np.zeros((0, 0), dtype=np.float32), usage)


@dataclass(frozen=True)
class TrainingStats:
    """What validated training data amounts to."""

    n_examples: int
    total_tokens: int
    """Tokens in the training file; providers bill this x epochs."""
    max_tokens: int
    """The longest example."""


def poll(fetch: Callable, done: Callable, *, interval: float, max_wait: float | None):
    """Call ``fetch`` until ``done(result)``, waiting ``interval`` seconds, backing off to 12x
    that; after ``max_wait`` seconds (None: never) return the last result, done or not."""
    retrying = Retrying(
        retry=retry_if_result(lambda result: not done(result)),
        wait=wait_exponential(multiplier=interval, min=interval, max=12 * interval),
        stop=stop_after_delay(max_wait) if max_wait is not None else stop_never,
        retry_error_callback=lambda state: state.outcome.result())
    return retrying(fetch)


def request_batches(token_counts: Sequence[int], *, max_inputs: int, max_tokens: int):
    """(start, stop) ranges of at most ``max_inputs`` inputs and ``max_tokens`` tokens (an
    input over the token cap goes alone)."""
    start, tokens = 0, 0
    for i, count in enumerate(token_counts):
        if i > start and (i - start >= max_inputs or tokens + count > max_tokens):
            yield start, i
            start, tokens = i, 0
        tokens += count
    if start < len(token_counts):
        yield start, len(token_counts)


def normalised(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows as float32, each scaled to unit L2 norm (zero rows stay zero)."""
    vectors = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1.0, norms)).astype(np.float32)


def whole_epochs(epochs: float, provider: str) -> int:
    if epochs != int(epochs):
        raise ConfigError(f"{provider} fine-tuning takes a whole number of epochs, not {epochs}")
    return int(epochs)


def jsonl(rows: Iterable) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


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


def scrub(text: str, secret: str) -> str:
    """``text`` with the API key replaced by ``***`` (keys too short to be real are left)."""
    return text.replace(secret, "***") if len(secret) >= 8 else text


def server_message(error, secret: str) -> str:
    """The server's own words in an SDK status error: the ``message`` of its body (or of the
    body's ``error``), the key removed."""
    body = error.body if isinstance(error.body, dict) else {}
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    return scrub(str(inner.get("message") or error.message), secret)


@contextmanager
def sdk_errors(sdk, what: str, *, where: str, client, secret: str, key_env: str,
               base: type[Exception]):
    """The one place an SDK's errors become :class:`~semievol.errors.BackendError`, each
    saying what failed, where, and whether running again resumes. ``sdk`` is the
    ``openai`` or ``together`` module, ``base`` its root exception; the SDK has already
    retried what is worth it."""
    retries = client.max_retries
    try:
        yield
    except sdk.APITimeoutError:
        raise BackendError(f"{what}: {where} did not answer within {client.timeout} s "
                           f"({retries} retries); run again to resume") from None
    except sdk.APIConnectionError as e:
        raise BackendError(f"{what}: could not reach {where} ({retries} retries): "
                           f"{scrub(str(e.__cause__ or e), secret)}; run again to resume"
                           ) from None
    except (sdk.AuthenticationError, sdk.PermissionDeniedError) as e:
        raise BackendError(f"{what}: {where} refused the API key (HTTP {e.status_code}): "
                           f"{server_message(e, secret)}. Set {key_env}.") from None
    except sdk.RateLimitError as e:
        raise BackendError(f"{what}: rate-limited or out of quota or credit (HTTP 429) after "
                           f"{retries} retries: {server_message(e, secret)}; run again later "
                           "to resume") from None
    except sdk.APIStatusError as e:
        hint = "; run again to resume" if e.status_code >= 500 else ""
        raise BackendError(f"{what}: HTTP {e.status_code} from {where}: "
                           f"{server_message(e, secret)}{hint}") from None
    except base as e:
        raise BackendError(f"{what}: {scrub(str(e), secret)}") from None
