"""The Tinker dialect's state (:mod:`semievol.server.tinker`): sessions, sampling sessions
and futures of one server process, the queue that runs the requests that compute, and the
lookups its routes share. Training runs and checkpoints live in the store."""
from __future__ import annotations

import concurrent.futures
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import Request

from ..errors import SemievolError
from .http import ApiError, Server

KEEP_FUTURES = 4096
"""Finished futures kept for retrieval (a client may ask again after a dropped
connection); older ones are forgotten and answered 410."""


class Failed(SemievolError):
    """A queued request that failed for a reason the client can fix (category ``user``)."""


@dataclass
class Tinker:
    """Sessions, samplers and futures of one server (the store keeps runs and checkpoints)."""

    server: Server
    root: Path
    sessions: dict[str, float] = field(default_factory=dict)
    samplers: dict[str, dict] = field(default_factory=dict)
    """sampling session id -> {"base_model", "model_path", "ref"}."""
    ephemeral: dict[str, str] = field(default_factory=dict)
    """tinker path -> directory of the unnamed sampler weights this process saved
    (``save_weights_and_get_sampling_client``): not listed, removed on the next start."""
    futures: dict[str, concurrent.futures.Future] = field(default_factory=dict)
    sent: dict[tuple, str] = field(default_factory=dict)
    """(kind, target, seq_id) -> request id: what each sequenced request was answered."""
    worker: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, "tinker"))
    lock: threading.Lock = field(default_factory=threading.Lock)
    _primitives: Any = None

    @property
    def base_model(self) -> str:
        return self.server.backend.default_model

    @property
    def primitives(self):
        """The hf backend's LoRA primitives (made on first use)."""
        if self._primitives is None:
            if getattr(self.server.backend, "name", None) != "hf":
                raise ApiError(400, "The Tinker API needs `semievol serve --backend hf`.")
            from ..backends.hf.primitives import Primitives

            self._primitives = Primitives(self.server.backend)
        return self._primitives

    def submit(self, kind: str, work, *, target: str | None = None,
               seq_id: int | None = None) -> dict:
        """Queue ``work()`` (run under the backend lock); the SDK's untyped future.

        A request the SDK sends again (a retry after a dropped connection) has the same
        ``seq_id`` for the same ``target`` (a training run or sampling session): it gets
        the first one's future rather than running twice (a forward_backward twice would
        add its gradients twice)."""
        key = (kind, target, seq_id) if target is not None and seq_id is not None else None

        def run():
            with self.server.backend_lock:
                return work()

        with self.lock:
            if key is not None and key in self.sent:
                return {"request_id": self.sent[key]}
            request_id = f"{kind}-{secrets.token_hex(8)}"
            self.futures[request_id] = self.worker.submit(run)
            if key is not None:
                self.sent[key] = request_id
            if len(self.futures) > KEEP_FUTURES:
                done = [key for key, f in self.futures.items() if f.done()]
                for old in done[:len(self.futures) - KEEP_FUTURES]:
                    del self.futures[old]
                self.sent = {k: v for k, v in self.sent.items() if v in self.futures}
        return {"request_id": request_id}

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id.replace(":", "_")

    # -- lookups the routes share ---------------------------------------------------------
    def check_base(self, base_model: str | None) -> None:
        if base_model is not None and base_model != self.base_model:
            raise ApiError(400, f"Base model '{base_model}' is not served here; this server "
                           f"serves '{self.base_model}'.", param="base_model",
                           code="model_not_available")

    def training_run(self, model_id: str) -> dict:
        record = self.server.store.training_run(model_id)
        if record is None:
            raise ApiError(404, f"No training run '{model_id}'.", param="model_id")
        return record

    def live(self, model_id: str) -> None:
        """Fail a queued request on a run this server process holds no weights for."""
        if model_id not in self.primitives.runs:
            raise Failed(f"training run {model_id} is not loaded in this server process (it "
                         "was restarted): continue from one of its checkpoints with "
                         "create_training_client_from_state")

    def record_run(self, model_id: str, rank: int, metadata: dict | None) -> None:
        """A training run's record, the moment it exists (kept by a later touch)."""
        now = clock()
        old = self.server.store.training_run(model_id) or {}
        self.server.store.put_training_run({
            "id": model_id, "base_model": self.base_model, "rank": rank,
            "created": old.get("created", now), "last_request": now,
            "user_metadata": metadata if metadata is not None else old.get("user_metadata")})

    def checkpoint(self, path: str, param: str = "path") -> dict:
        record = self.server.store.checkpoint(path)
        if record is None:
            raise ApiError(404, f"No checkpoint '{path[:200]}' on this server.", param=param)
        return record

    def new_sampler(self, model_path: str | None, ref: str) -> str:
        session = "sampler-" + secrets.token_hex(8)
        self.samplers[session] = {"base_model": self.base_model, "model_path": model_path,
                                  "ref": ref}
        return session


_STATE_LOCK = threading.Lock()


def tinker_of(request: Request) -> Tinker:
    """The app's Tinker state, made on first use (which removes the ephemeral sampler
    weights a previous process left)."""
    app = request.app
    with _STATE_LOCK:
        state = getattr(app.state, "tinker", None)
        if state is None:
            server = app.state.server
            state = app.state.tinker = Tinker(server, server.store.backend_dir / "tinker")
            for stale in state.root.glob("*/ephemeral"):
                shutil.rmtree(stale, ignore_errors=True)
    return state


def clock() -> float:
    return time.time()


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()
