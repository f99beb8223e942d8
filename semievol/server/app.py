"""The app, assembled: the state, the fine-tuning worker, the HTTP plumbing, OpenAI's
dialect and the other dialects given (:func:`semievol.server.create_app` adds Together's
and Tinker's)."""
from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from . import openai
from .http import Dialect, Server, install
from .jobs import Trainer
from .store import Store
from ..chatfile import MIN_EXAMPLES


def create_app(backend, state_dir: str | Path, api_key: str | None = None, *,
               max_upload_mb: int = 512, min_examples: int = MIN_EXAMPLES,
               dialects: tuple[Dialect, ...] = ()) -> FastAPI:
    """The ASGI app serving ``backend`` with its state in ``state_dir``: OpenAI's dialect,
    then the other ``dialects``.

    ``api_key``: when set, every request needs ``Authorization: Bearer <api_key>``.
    ``max_upload_mb``: the largest file an upload takes. ``min_examples``: the fewest
    training examples a job accepts (OpenAI's 10; a job may set its own). The fine-tuning
    worker starts with the app (its lifespan) and first recovers the jobs a stopped server
    left."""
    store = Store(state_dir)
    lock = threading.Lock()
    server = Server(backend, store, Trainer(store, backend, lock, min_examples=min_examples),
                    lock, api_key, max_upload_mb * 2**20,
                    dialects=(openai.dialect(), *dialects))

    @asynccontextmanager
    async def lifespan(app):
        server.trainer.start()
        yield
        server.trainer.stop()

    app = FastAPI(title="semievol OpenAI-compatible API", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    install(app, server)
    return app
