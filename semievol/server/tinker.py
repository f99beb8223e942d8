"""The Tinker API's dialect, served beside OpenAI's and Together's on the same port, so the
official ``tinker`` SDK (``ServiceClient(base_url="http://HOST:PORT")``) trains and samples
a local model with LoRA by primitives. Needs the hf backend and the ``tinker`` package
(``pip install "semievol[serve,tinker]"``), whose protobuf schema the SDK speaks for
``forward_backward`` and for the results of ``forward_backward`` and ``asample`` (the wire
format: :mod:`.tinker_wire`; the torch side: :mod:`semievol.backends.hf.primitives`).

    POST /api/v1/client/config  /client/dynamic_config  /create_session  /session_heartbeat
    POST /api/v1/sessions/{id}/finish  /telemetry     GET /api/v1/healthz  /get_server_capabilities
    POST /api/v1/create_model  /get_info  /forward_backward  /optim_step
    POST /api/v1/save_weights  /load_weights  /save_weights_for_sampler  /weights_info
    POST /api/v1/create_sampling_session  /asample  /retrieve_future   GET /api/v1/samplers/{id}
    GET  /api/v1/training_runs  /training_runs/{id}  /training_runs/{id}/checkpoints  /checkpoints

The future pattern: a request that computes (create_model, forward_backward, optim_step,
the saves and loads, asample) is queued and answered at once with a ``request_id``; one
worker runs the queue in arrival order (the SDK sends a training client's requests in turn,
so that is their ``seq_id`` order) under the backend's lock, and ``retrieve_future``
answers the result, ``try_again`` while it runs, or ``{"error", "category"}`` when it
failed, which the SDK raises as its own ``RequestFailedError``. A request sent again with
the same ``seq_id`` for the same training run or sampling session (the SDK's retry after a
dropped connection) gets the first one's future: it never runs twice. Futures live in
memory: a restarted server answers 410 for an old one, on which the SDK sends its request
again.

Training runs and checkpoints live in the store (SQLite), so a restarted server still lists
them and loads their checkpoints; the adapters and optimizer states themselves are
directories under ``<state-dir>/backend/tinker/``. A training run's id is its model id,
``<session>:train:<n>``; checkpoint paths are ``tinker://<run>/weights/<name>`` (adapter and
optimizer state, from ``save_state``) and ``tinker://<run>/sampler_weights/<name>`` (the
adapter, from ``save_weights_for_sampler``).

What it does: LoRA (alpha 32, as Tinker) on attention, MLP and output layers as asked;
the ``cross_entropy`` loss ``-sum(weights * logprobs)`` over each datum's target tokens,
accumulated until ``optim_step`` (Adam); sampling with the hf backend's decode loop, a raw
log-probability for every sampled token (the stop token included, as Tinker returns it).
What it refuses, with a 400 the SDK raises as ``BadRequestError``: other losses, custom
losses, images, top-k logprobs, top-k / top-p sampling, base models other than the one
served. Prompt logprobs (``compute_logprobs``) come from the backend's teacher-forced scorer.
Authentication: the SDK sends its key as ``X-API-Key`` (it insists on keys that start with
``tml-``); the server checks it before reading the body, as for the other dialects.
"""
from __future__ import annotations

import concurrent.futures
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..errors import SemievolError
from . import tinker_wire as wire
from .app import ApiError, Server, authorize, log
from .tinker_wire import (MAX_CONTEXT, AdamParams, CreateModel, CreateSamplingSession,
                          LoadWeights, LoraSpec, OptimStep, SampleBody, SaveWeights)

router = APIRouter(prefix="/api/v1", dependencies=[Depends(authorize)])

RETRIEVE_WAIT_S = 20.0
"""How long ``retrieve_future`` waits for a running request before answering try_again."""
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,  # the API key itself, no JWT exchange
    "use_pyqwest_transport": False,
    "parallel_fwdbwd_chunks": False,  # chunks in order: one worker runs them in turn
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "custom_loss_server_side": False,
    "sample_join_sampling_session": False,
}
"""The feature flags the SDK asks for (``/client/config``): the plain paths."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A checkpoint name a client may choose (it becomes a directory name)."""
KINDS = {"weights": "training", "sampler_weights": "sampler"}
TOKENIZERS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The hub id of a served alias's tokenizer (``get_info``'s ``tokenizer_id``, which the
SDK's ``get_tokenizer`` loads); any other served name is its own tokenizer's id."""
KEEP_FUTURES = 4096
"""Finished futures kept for retrieval (a client may ask again after a dropped
connection); older ones are forgotten and answered 410."""


# -- the dialect's state -------------------------------------------------------------------
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


_STATE_LOCK = threading.Lock()


def _tinker(request: Request) -> Tinker:
    app = request.app
    with _STATE_LOCK:
        state = getattr(app.state, "tinker", None)
        if state is None:
            server = app.state.server
            state = app.state.tinker = Tinker(server, server.store.backend_dir / "tinker")
            for stale in state.root.glob("*/ephemeral"):
                shutil.rmtree(stale, ignore_errors=True)
    return state


def _now() -> float:
    return time.time()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


# -- session and service routes --------------------------------------------------------
@router.post("/client/config")
def client_config():
    return CLIENT_CONFIG


@router.post("/client/dynamic_config")
def client_dynamic_config():
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.post("/telemetry")
def telemetry():
    return {"status": "accepted"}


@router.get("/get_server_capabilities")
def capabilities(request: Request):
    name = _tinker(request).base_model
    return {"supported_models": [{"model_name": name, "max_context_length": MAX_CONTEXT,
                                  "trainable": True, "sampleable": True}]}


@router.post("/create_session")
def create_session(request: Request):
    tinker = _tinker(request)
    session_id = "session-" + secrets.token_hex(8)
    tinker.sessions[session_id] = _now()
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
def session_heartbeat(request: Request):
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(request: Request, session_id: str):
    """The session's training runs leave memory (after their queued requests); their
    checkpoints stay."""
    tinker = _tinker(request)
    tinker.sessions.pop(session_id, None)
    if tinker._primitives is not None:
        primitives = tinker.primitives

        def work():
            for name in [n for n in primitives.runs if n.startswith(f"{session_id}:train:")]:
                primitives.drop(name)

        tinker.submit("finish", work)
    return {}


# -- training ----------------------------------------------------------------------------
def _check_base(tinker: Tinker, base_model: str | None) -> None:
    if base_model is not None and base_model != tinker.base_model:
        raise ApiError(400, f"Base model '{base_model}' is not served here; this server "
                       f"serves '{tinker.base_model}'.", param="base_model",
                       code="model_not_available")


def _training_run(tinker: Tinker, model_id: str) -> dict:
    record = tinker.server.store.training_run(model_id)
    if record is None:
        raise ApiError(404, f"No training run '{model_id}'.", param="model_id")
    return record


def _live(tinker: Tinker, model_id: str) -> None:
    """Fail a queued request on a run this server process holds no weights for."""
    if model_id not in tinker.primitives.runs:
        raise Failed(f"training run {model_id} is not loaded in this server process (it was "
                     "restarted): continue from one of its checkpoints with "
                     "create_training_client_from_state")


@router.post("/create_model")
def create_model(request: Request, body: CreateModel):
    tinker = _tinker(request)
    _check_base(tinker, body.base_model)
    if body.optimizer_config and body.optimizer_config.get("type", "adamw") != "adamw":
        raise ApiError(400, "Only the Adam optimizer is supported by this server.",
                       param="optimizer_config")
    lora = body.lora_config or LoraSpec(rank=32)
    primitives = tinker.primitives
    model_id = f"{body.session_id}:train:{body.model_seq_id}"

    def work():
        primitives.drop(model_id)
        primitives.create(model_id, rank=lora.rank, seed=lora.seed, train_mlp=lora.train_mlp,
                          train_attn=lora.train_attn, train_unembed=lora.train_unembed)
        _record_run(tinker, model_id, lora.rank, body.user_metadata)
        return {"type": "create_model", "model_id": model_id}

    return {**tinker.submit("create_model", work), "model_id": model_id}


def _record_run(tinker: Tinker, model_id: str, rank: int, metadata: dict | None) -> None:
    """A training run's record, the moment it exists (kept by a later touch)."""
    now = _now()
    old = tinker.server.store.training_run(model_id) or {}
    tinker.server.store.put_training_run({
        "id": model_id, "base_model": tinker.base_model, "rank": rank,
        "created": old.get("created", now), "last_request": now,
        "user_metadata": metadata if metadata is not None else old.get("user_metadata")})


@router.post("/get_info")
def get_info(request: Request, body: dict):
    tinker = _tinker(request)
    run = _training_run(tinker, str(body.get("model_id")))
    return {"type": "get_info", "model_id": run["id"], "model_name": run["base_model"],
            "model_data": {"arch": "llama", "model_name": run["base_model"],
                           "tokenizer_id": TOKENIZERS.get(run["base_model"],
                                                          run["base_model"])},
            "is_lora": True, "lora_rank": run["rank"],
            "optimizer_config": {"type": "adamw"}}


@router.post("/forward_backward")
async def forward_backward(request: Request):
    """Decode the SDK's protobuf request; queue the pass (forward only when asked)."""
    tinker = _tinker(request)
    if request.headers.get("content-encoding", "identity") != "identity":
        raise ApiError(400, "Compressed forward_backward bodies are not supported; this "
                       "server's /client/config turns compression off.")
    message = wire.forward_backward_request(await request.body())
    _training_run(tinker, message.model_id)
    if message.loss_fn != "cross_entropy":
        raise ApiError(400, f"Loss '{message.loss_fn}' is not supported by this server; use "
                       "'cross_entropy'.", param="loss_fn")
    data = [wire.datum(i, d) for i, d in enumerate(message.data)]
    if not data:
        raise ApiError(400, "forward_backward needs at least one datum.", param="data")
    backward = not message.forward_only
    model_id, primitives = message.model_id, tinker.primitives

    def work():
        _live(tinker, model_id)
        logprobs, loss = primitives.forward_backward(model_id, data, backward=backward)
        return wire.forward_backward_output(logprobs, loss)

    return tinker.submit("forward_backward", work, target=model_id, seq_id=message.seq_id)


@router.post("/optim_step")
def optim_step(request: Request, body: OptimStep):
    tinker = _tinker(request)
    _training_run(tinker, body.model_id)
    if body.optimizer_params is not None and body.adam_params is None:
        raise ApiError(400, "Only Adam steps (adam_params) are supported by this server.",
                       param="optimizer_params")
    adam = body.adam_params or AdamParams()
    primitives = tinker.primitives

    def work():
        _live(tinker, body.model_id)
        metrics = primitives.optim_step(body.model_id, **adam.model_dump())
        run = tinker.server.store.training_run(body.model_id)
        _record_run(tinker, body.model_id, run["rank"], None)
        return {"type": "optim_step", "metrics": metrics}

    return tinker.submit("optim_step", work, target=body.model_id, seq_id=body.seq_id)


# -- checkpoints ------------------------------------------------------------------------
def _name(value: str | None) -> str | None:
    if value is None:
        return None
    if not NAME.fullmatch(value):
        raise ApiError(400, f"Invalid checkpoint name '{value[:64]}': use 1-128 letters, "
                       "digits, '.', '_' or '-', starting with a letter or digit.",
                       param="path")
    return value


def _save(tinker: Tinker, model_id: str, name: str | None, kind: str, metadata: dict | None,
          overwrite: bool = False) -> dict:
    """Save run ``model_id``'s adapter (with its optimizer for ``weights``) as checkpoint
    ``name``: written to a temporary directory, renamed into place, then recorded (a
    directory without its record, left by a kill, is replaced). Unnamed: an ephemeral
    sampler checkpoint, not recorded."""
    ephemeral = name is None
    name = name or "ephemeral-" + secrets.token_hex(6)
    path = f"tinker://{model_id}/{kind}/{name}"
    if tinker.server.store.checkpoint(path) is not None and not overwrite:
        raise Failed(f"checkpoint {path} already exists (save with overwrite=True to "
                     "replace it)")
    final = tinker.run_dir(model_id) / ("ephemeral" if ephemeral else kind) / name
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.parent / f".{name}-{secrets.token_hex(4)}"
    try:
        size = tinker.primitives.save(model_id, scratch, optimizer=kind == "weights")
        shutil.rmtree(final, ignore_errors=True)
        scratch.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if ephemeral:
        tinker.ephemeral[path] = str(final)
        return {"path": path, "directory": str(final)}
    tinker.server.store.add_checkpoint({
        "tinker_path": path, "run_id": model_id, "checkpoint_id": f"{kind}/{name}",
        "checkpoint_type": KINDS[kind], "time": _now(), "size_bytes": size,
        "directory": str(final), "optimizer": kind == "weights",
        **({"user_metadata": metadata} if metadata else {})})
    return {"path": path, "directory": str(final)}


@router.post("/save_weights")
def save_weights(request: Request, body: SaveWeights):
    tinker = _tinker(request)
    _training_run(tinker, body.model_id)
    name = _name(body.path)

    def work():
        _live(tinker, body.model_id)
        saved = _save(tinker, body.model_id, name or "state-" + secrets.token_hex(6),
                      "weights", body.user_metadata, body.overwrite)
        return {"type": "save_weights", "path": saved["path"]}

    return tinker.submit("save_weights", work, target=body.model_id, seq_id=body.seq_id)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(request: Request, body: SaveWeights):
    """Named: a sampler checkpoint. Unnamed (``save_weights_and_get_sampling_client``):
    an ephemeral one and a sampling session on it."""
    tinker = _tinker(request)
    _training_run(tinker, body.model_id)
    name = _name(body.path)
    named = name is not None

    def work():
        _live(tinker, body.model_id)
        saved = _save(tinker, body.model_id, name, "sampler_weights", body.user_metadata,
                      body.overwrite)
        if named:
            return {"type": "save_weights_for_sampler", "path": saved["path"]}
        session = _new_sampler(tinker, saved["path"], saved["directory"])
        return {"type": "save_weights_for_sampler", "path": saved["path"],
                "sampling_session_id": session}

    return tinker.submit("save_weights_for_sampler", work, target=body.model_id,
                         seq_id=body.seq_id)


def _checkpoint(tinker: Tinker, path: str, param: str = "path") -> dict:
    record = tinker.server.store.checkpoint(path)
    if record is None:
        raise ApiError(404, f"No checkpoint '{path[:200]}' on this server.", param=param)
    return record


@router.post("/load_weights")
def load_weights(request: Request, body: LoadWeights):
    """Into an existing run (``model_id``), or a new run made from the checkpoint
    (``session_id`` + ``model_seq_id``, ``create_training_client_from_state``)."""
    tinker = _tinker(request)
    checkpoint = _checkpoint(tinker, body.path)
    if body.optimizer and not checkpoint["optimizer"]:
        raise ApiError(400, f"Checkpoint {body.path} holds no optimizer state (saved for "
                       "sampling); load it without the optimizer.", param="optimizer")
    if body.model_id is not None:
        model_id = body.model_id
        _training_run(tinker, model_id)
    elif body.session_id is not None and body.model_seq_id is not None:
        _check_base(tinker, body.base_model)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
    else:
        raise ApiError(400, "Name the model to load into (model_id), or a session_id and "
                       "model_seq_id for a new one.", param="model_id")
    source = tinker.server.store.training_run(checkpoint["run_id"])
    primitives = tinker.primitives

    def work():
        primitives.drop(model_id)
        primitives.load(model_id, checkpoint["directory"], optimizer=body.optimizer)
        _record_run(tinker, model_id, source["rank"] if source else 0, body.user_metadata)
        return {"type": "load_weights", "path": body.path, "model_id": model_id}

    return tinker.submit("load_weights", work, target=model_id, seq_id=body.seq_id)


@router.post("/weights_info")
def weights_info(request: Request, body: dict):
    tinker = _tinker(request)
    checkpoint = _checkpoint(tinker, str(body.get("tinker_path")), "tinker_path")
    run = tinker.server.store.training_run(checkpoint["run_id"]) or {}
    return {"base_model": tinker.base_model, "is_lora": True, "lora_rank": run.get("rank"),
            "optimizer_config": {"type": "adamw"}}


def _checkpoint_view(record: dict) -> dict:
    return {"checkpoint_id": record["checkpoint_id"],
            "checkpoint_type": record["checkpoint_type"], "time": _iso(record["time"]),
            "tinker_path": record["tinker_path"], "size_bytes": record["size_bytes"],
            "public": False, "user_metadata": record.get("user_metadata"),
            "expires_at": None}


def _run_view(tinker: Tinker, run: dict) -> dict:
    checkpoints = tinker.server.store.checkpoints(run["id"])

    def last(kind):
        found = [c for c in checkpoints if c["checkpoint_type"] == kind]
        return _checkpoint_view(found[-1]) if found else None

    return {"training_run_id": run["id"], "base_model": run["base_model"],
            "model_owner": "semievol", "is_lora": True, "corrupted": False,
            "lora_rank": run["rank"], "last_request_time": _iso(run["last_request"]),
            "last_checkpoint": last("training"), "last_sampler_checkpoint": last("sampler"),
            "user_metadata": run["user_metadata"]}


@router.get("/training_runs")
def training_runs(request: Request, limit: int = 20, offset: int = 0):
    tinker = _tinker(request)
    runs = tinker.server.store.training_runs()
    return {"training_runs": [_run_view(tinker, r) for r in runs[offset:offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}


@router.get("/training_runs/{run_id}")
def training_run(request: Request, run_id: str):
    tinker = _tinker(request)
    return _run_view(tinker, _training_run(tinker, run_id))


@router.get("/training_runs/{run_id}/checkpoints")
def run_checkpoints(request: Request, run_id: str):
    tinker = _tinker(request)
    _training_run(tinker, run_id)
    return {"checkpoints": [_checkpoint_view(c)
                            for c in tinker.server.store.checkpoints(run_id)]}


@router.get("/checkpoints")
def all_checkpoints(request: Request, limit: int = 100, offset: int = 0):
    found = _tinker(request).server.store.checkpoints()
    return {"checkpoints": [_checkpoint_view(c) for c in found[offset:offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(found)}}


# -- sampling ----------------------------------------------------------------------------
def _new_sampler(tinker: Tinker, model_path: str | None, ref: str) -> str:
    session = "sampler-" + secrets.token_hex(8)
    tinker.samplers[session] = {"base_model": tinker.base_model, "model_path": model_path,
                                "ref": ref}
    return session


def _sampler_ref(tinker: Tinker, model_path: str | None, base_model: str | None) -> str:
    """The backend reference of a sampling target: a sampler or training checkpoint's
    adapter directory, or the base model."""
    if model_path is not None:
        if model_path in tinker.ephemeral:
            return tinker.ephemeral[model_path]
        return _checkpoint(tinker, model_path, "model_path")["directory"]
    if base_model is None:
        raise ApiError(400, "Name a model_path or a base_model to sample from.",
                       param="base_model")
    _check_base(tinker, base_model)
    return tinker.base_model


@router.post("/create_sampling_session")
def create_sampling_session(request: Request, body: CreateSamplingSession):
    tinker = _tinker(request)
    ref = _sampler_ref(tinker, body.model_path, body.base_model)
    return {"type": "create_sampling_session",
            "sampling_session_id": _new_sampler(tinker, body.model_path, ref)}


@router.get("/samplers/{sampler_id}")
def get_sampler(request: Request, sampler_id: str):
    sampler = _tinker(request).samplers.get(sampler_id)
    if sampler is None:
        raise ApiError(404, f"No sampling session '{sampler_id}'.", param="sampler_id")
    return {"sampler_id": sampler_id, "base_model": sampler["base_model"],
            "model_path": sampler["model_path"]}


@router.post("/asample")
def asample(request: Request, body: SampleBody):
    tinker = _tinker(request)
    wire.schema()  # a 501 now, not a failed future, without the tinker package
    if body.sampling_session_id is not None:
        sampler = tinker.samplers.get(body.sampling_session_id)
        if sampler is None:
            raise ApiError(404, f"No sampling session '{body.sampling_session_id}'.",
                           param="sampling_session_id")
        ref = sampler["ref"]
    else:
        ref = _sampler_ref(tinker, body.model_path, body.base_model)
    unsupported = [name for name, asked in (
        ("topk_prompt_logprobs", body.topk_prompt_logprobs),
        ("topk_sample_logprobs", body.topk_sample_logprobs),
        ("prompt_alt_tokens_k", body.prompt_alt_tokens_k),
        ("target_prompt_logprobs", body.target_prompt_logprobs)) if asked]
    if unsupported:
        raise ApiError(400, f"{unsupported[0]} is not supported by this server.",
                       param=unsupported[0])
    params = body.sampling_params
    if params.top_k not in (-1, 0) or params.top_p != 1.0:
        raise ApiError(400, "top_k and top_p sampling are not supported by this server.",
                       param="sampling_params")
    if any(chunk.type != "encoded_text" for chunk in body.prompt.chunks):
        raise ApiError(400, "Only token chunks are supported by this server.", param="prompt")
    prompt = [t for chunk in body.prompt.chunks for t in chunk.tokens]
    max_tokens = params.max_tokens or 256
    if not prompt or len(prompt) + max_tokens > MAX_CONTEXT:
        raise ApiError(400, f"The prompt ({len(prompt)} tokens) plus max_tokens "
                       f"({max_tokens}) must fit in {MAX_CONTEXT} tokens, with at least one "
                       "prompt token.", param="prompt")
    last_n = body.prompt_logprobs_last_n
    if last_n is not None and (not body.prompt_logprobs or last_n > len(prompt) - 1):
        raise ApiError(400, "prompt_logprobs_last_n needs prompt_logprobs and must be at most "
                       f"len(prompt) - 1 = {len(prompt) - 1}.", param="prompt_logprobs_last_n")
    stop = [params.stop] if isinstance(params.stop, str) else params.stop
    primitives = tinker.primitives

    def work():
        samples, scored = primitives.sample(
            ref, prompt, n=body.num_samples, temperature=params.temperature,
            max_tokens=max_tokens, stop=stop, seed=params.seed,
            prompt_logprobs=bool(body.prompt_logprobs))
        if scored is not None and last_n is not None:
            scored[:len(scored) - last_n] = [float("nan")] * (len(scored) - last_n)
        return wire.sample_output(samples, scored)

    future = tinker.submit("sample", work, target=body.sampling_session_id,
                           seq_id=body.seq_id)
    return {**future, "sample_sequence_ids": [f"{future['request_id']}-{i}"
                                              for i in range(body.num_samples)]}


# -- futures ------------------------------------------------------------------------------
@router.post("/retrieve_future")
def retrieve_future(request: Request, body: dict):
    """A queued request's result: protobuf bytes or JSON; ``try_again`` while it runs;
    ``{"error", "category"}`` when it failed; 410 for a future this process never made."""
    tinker = _tinker(request)
    request_id = str(body.get("request_id"))
    future = tinker.futures.get(request_id)
    if future is None:
        return JSONResponse({"error": {"message": f"Unknown or expired future {request_id}.",
                                       "type": "invalid_request_error", "param": "request_id",
                                       "code": "future_expired"}}, status_code=410)
    try:
        result = future.result(timeout=RETRIEVE_WAIT_S)
    except concurrent.futures.TimeoutError:
        return {"type": "try_again", "request_id": request_id, "queue_state": "active"}
    except (Failed, ApiError) as e:
        return {"error": e.message if isinstance(e, ApiError) else str(e), "category": "user"}
    except Exception as e:
        log.exception("Tinker request %s failed", request_id)
        return {"error": f"{type(e).__name__}: {e}", "category": "server"}
    if isinstance(result, bytes):
        return Response(result, media_type=wire.PROTO)
    return result

