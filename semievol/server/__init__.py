"""``semievol serve``: an OpenAI-compatible HTTP API (files, fine-tuning jobs, chat
completions with logprobs, embeddings, models) over a local backend, so any OpenAI
fine-tuning client, our own OpenAI backend first, can evolve a local model. It speaks
Together's dialect too, on the same port, so the together backend can as well, and the
Tinker API's (on the hf backend, with the ``tinker`` package), so the tinker SDK can.

    app.py           assembles the app: the state, the worker, the plumbing, the dialects
    http.py          the plumbing: Server, the Dialect hooks, errors, auth and body limits
                     (auth is checked from the headers, before any body is read)
    service.py       what every dialect shares: upload, submit a job, resolve a model name
    openai.py        OpenAI's dialect (/v1/files, /v1/fine_tuning/jobs, /v1/chat/completions,
                     /v1/embeddings, /v1/models); schemas.py its request bodies (pydantic),
                     chat.py its choices, stop sequences, logprobs and embedding rows
    together.py      Together's dialect on the same port (/v1/files/upload, /v1/fine-tunes,
                     /v1/hardware, /v1/endpoints), and its hooks: integer chat logprobs,
                     dedicated endpoints
    tinker.py        Tinker's dialect on the same port (/api/v1/...: sessions, sampling,
                     futures); tinker_train.py its training runs and checkpoints
                     (forward_backward, optim_step, saves and loads), tinker_state.py the
                     state both share, tinker_wire.py its request bodies and protobuf messages
    __main__.py      ``python -m semievol.server``: the arguments of ``semievol serve``
    jobs.py          the fine-tuning worker and the hyperparameter mapping
    store.py         the state directory: files, jobs, events, fine-tuned models, endpoints,
                     Tinker training runs and checkpoints
                     (training files are checked by ../chatfile.py, the way OpenAI checks them)

Where it differs from the real API: one base model is served (the backend's default, or
``--model``), and other names are refused rather than loaded, since the backend would read a
model name as a hub id or a directory; fine-tuning is ``supervised`` only, without
validation metrics, result files, integrations or streaming; ``top_logprobs`` is always
empty; ``stop`` is applied after generation; a cancelled running job trains to its end
(its result is discarded); chat and embeddings wait while a job trains (one backend, one
lock). Job ids, file ids and events have OpenAI's shapes; failed file validation adds
``error.line``.

FastAPI and uvicorn come with the ``serve`` extra (``pip install "semievol[serve]"``); they
are imported only when a server is built, so ``import semievol.server`` needs neither.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..backends.hosted import is_loopback
from ..errors import ConfigError

__all__ = ["create_app", "serve", "default_state_dir"]

log = logging.getLogger("semievol.server")


def create_app(backend, state_dir: str | Path, api_key: str | None = None, *,
               dedicated_lora: bool = False, **options):
    """The ASGI app over a built backend, in OpenAI's, Together's and Tinker's dialects (see
    :func:`semievol.server.app.create_app` for the options; ``dedicated_lora``:
    :func:`semievol.server.together.dialect`)."""
    from . import tinker, together
    from .app import create_app as build

    return build(backend, state_dir, api_key, **options,
                 dialects=(together.dialect(dedicated_lora), tinker.dialect()))


def default_state_dir() -> Path:
    """Where state lives without ``--state-dir``: ``./semievol-serve``, so a server
    restarted in the same directory finds its jobs."""
    return Path("semievol-serve")


def serve(backend: str, model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          state_dir: str | Path | None = None, api_key: str | None = None,
          max_upload_mb: int = 512, vllm_url: str | None = None,
          dtype: str | None = None, api_key_file: str | Path | None = None,
          dedicated_lora: bool = False) -> None:
    """Build the backend and run the server until interrupted.

    The backend is ``load_backend(backend, model=model, workdir=<state_dir>/backend)``
    (``model`` only when given; on hf, ``dtype`` when given, and ``vllm_url``: generate on
    that vLLM server). ``dedicated_lora``: serve the fine-tunes of Together's dialect
    only on dedicated endpoints, as api.together.ai does for some models. ``api_key``
    falls back to the contents of ``api_key_file``, then to
    ``$SEMIEVOL_API_KEY`` (either keeps the key out of ``ps``); without any, requests need
    no key, so the server binds to loopback by default."""
    from ..backends import load_backend

    try:
        import uvicorn
    except ImportError as e:
        raise ImportError('semievol serve needs fastapi and uvicorn: '
                          'pip install "semievol[serve]"') from e
    state = Path(state_dir) if state_dir is not None else default_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    api_key = api_key or _read_key(api_key_file) or os.environ.get("SEMIEVOL_API_KEY") or None
    options = {"workdir": (state / "backend").resolve()}
    if model is not None:
        options["model"] = model
    if vllm_url is not None:
        if backend != "hf":
            raise ConfigError("--vllm-url works with the hf backend")
        options["vllm_url"] = vllm_url
    if dtype is not None:
        options["dtype"] = dtype
    backend_obj = load_backend(backend, **options)
    if api_key is None and not is_loopback(host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it "
                    "(set --api-key or SEMIEVOL_API_KEY)", host)
    app = create_app(backend_obj, state, api_key, max_upload_mb=max_upload_mb,
                     dedicated_lora=dedicated_lora)
    # A request waiting behind a training job must not hold up a shutdown for long.
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


def _read_key(path: str | Path | None) -> str | None:
    """The key in the file at ``path`` (surrounding whitespace dropped), or None."""
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"--api-key-file {path} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--api-key-file {path} is not UTF-8 text") from None
    if not key:
        raise ConfigError(f"--api-key-file {path} is empty")
    return key

