"""The one place a hosted API's SDK errors become semievol's (:func:`sdk_errors`), for
every SDK generated from the one template (``openai``, ``together``, ``tinker``: they raise
the same classes, each from its own module). The SDK has already retried connection errors
and 408/409/429/5xx ``max_retries`` times (honouring Retry-After), each request limited to
``timeout`` seconds; what still fails is translated here, saying what failed, where, and
whether running again resumes, with the API key scrubbed from every message::

    APIConnectionError, APITimeoutError ──┐
    AuthenticationError, PermissionDenied ├─> BackendError  (says what to do)
    RateLimitError, other APIStatusError ─┘
    the SDK's own checks of a request (ValueError) ──> ConfigError

The lifecycle adds its own (see :mod:`.hosted`), and adapters theirs.
"""
from __future__ import annotations

from contextlib import contextmanager

from ..errors import BackendError, ConfigError, SemievolError


def scrub(text: str, secret: str) -> str:
    """``text`` with the API key replaced by ``***`` (keys too short to be real are left)."""
    return text.replace(secret, "***") if len(secret) >= 8 else text


def server_message(error) -> str:
    """The server's own words in an SDK status error: the ``message`` of its body (or of the
    body's ``error``). Scrub the key from it."""
    body = error.body if isinstance(error.body, dict) else {}
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    return str(inner.get("message") or error.message)


@contextmanager
def sdk_errors(sdk, what: str, *, where: str, retries, timeout, secret: str, key_env: str,
               base: type[Exception]):
    """The one place an SDK's errors become :class:`~semievol.errors.BackendError`, each
    saying what failed, where, and whether running again resumes. ``sdk`` is the
    provider's SDK module (``openai``, ``together``, ``tinker``: generated from one
    template, they raise the same classes), ``base`` its root exception; the SDK has
    already retried what is worth it (``retries`` times, ``timeout`` seconds a request, as
    the messages say). semievol's own errors pass through."""
    try:
        yield
    except SemievolError:
        raise
    except sdk.APITimeoutError:
        raise BackendError(f"{what}: {where} did not answer within {timeout} s "
                           f"({retries} retries); run again to resume") from None
    except sdk.APIConnectionError as e:
        raise BackendError(f"{what}: could not reach {where} ({retries} retries): "
                           f"{scrub(str(e.__cause__ or e), secret)}; run again to resume"
                           ) from None
    except (sdk.AuthenticationError, sdk.PermissionDeniedError) as e:
        raise BackendError(f"{what}: {where} refused the API key (HTTP {e.status_code}): "
                           f"{scrub(server_message(e), secret)}. Set {key_env}.") from None
    except sdk.RateLimitError as e:
        raise BackendError(f"{what}: rate-limited or out of quota or credit (HTTP 429) after "
                           f"{retries} retries: {scrub(server_message(e), secret)}; run again "
                           "later to resume") from None
    except sdk.APIStatusError as e:
        hint = "; run again to resume" if e.status_code >= 500 else ""
        raise BackendError(f"{what}: HTTP {e.status_code} from {where}: "
                           f"{scrub(server_message(e), secret)}{hint}") from None
    except base as e:
        raise BackendError(f"{what}: {scrub(str(e), secret)}") from None
    except ValueError as e:  # the SDK's own checks of a request
        raise ConfigError(f"{what}: {scrub(str(e), secret)}") from None
