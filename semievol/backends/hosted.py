"""What the two hosted-API backends (``openai``, ``together``) share, in one home: the job
records that keep a crashed run from paying twice, polling with tenacity, the translation of
SDK errors into semievol's, and the small pure helpers (digests, file names, JSONL, request
batches, normalised embedding rows).

Nothing here imports a provider SDK: both SDKs are generated from the same template and
raise the same exception classes, each from its own module, which is passed in.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from tenacity import Retrying, retry_if_result, stop_after_delay, stop_never, wait_exponential

from ..errors import BackendError, ConfigError
from ..rundir import atomic_write_json


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


@dataclass(frozen=True)
class TrainingStats:
    """What validated training data amounts to."""

    n_examples: int
    total_tokens: int
    """Tokens in the training file; providers bill this x epochs."""
    max_tokens: int
    """The longest example."""


def example_problem(example, roles: set[str], keys: set[str]) -> str | None:
    """What is wrong with one chat training example (None: nothing): not a list of message
    dicts with ``role`` and string ``content``, a role or key outside ``roles`` / ``keys``,
    a ``weight`` other than 0/1, or no assistant message."""
    if not isinstance(example, (list, tuple)) or not example:
        return "not a non-empty list of messages"
    for j, message in enumerate(example):
        if not isinstance(message, dict):
            return f"message {j} is not a dict"
        if "role" not in message or "content" not in message:
            return f"message {j} lacks 'role' or 'content'"
        if unknown := set(message) - keys:
            return f"message {j} has unknown keys {sorted(unknown)}"
        if message["role"] not in roles:
            return f"message {j} has unknown role {message['role']!r}"
        if not isinstance(message["content"], str):
            return f"message {j} content is not a string"
        if message.get("weight", 1) not in (0, 1):
            return f"message {j} weight must be 0 or 1"
    if not any(m["role"] == "assistant" for m in example):
        return "no assistant message"
    return None


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


def digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def slug(key: str) -> str:
    """A file name for a key: its readable part and a hash (keys may hold any character)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-.")[:60]
    return f"{readable}-{digest(key)[:8]}" if readable else digest(key)[:16]


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


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
