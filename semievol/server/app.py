"""The HTTP routes: the part of the OpenAI API that fine-tuning workflows use, over one
Backend (Together's dialect is added by ``together.py``, on the helpers here; the app with
both is :func:`semievol.server.create_app`).

    POST /v1/files   GET /v1/files   GET|DELETE /v1/files/{id}   GET /v1/files/{id}/content
    POST /v1/fine_tuning/jobs   GET /v1/fine_tuning/jobs   GET /v1/fine_tuning/jobs/{id}
    POST /v1/fine_tuning/jobs/{id}/cancel   GET /v1/fine_tuning/jobs/{id}/events
    POST /v1/chat/completions   POST /v1/embeddings   GET /v1/models   GET /v1/models/{id}

Every error, unknown routes, bad bodies and auth failures included, is OpenAI's body
``{"error": {"message", "type", "param", "code"}}`` with the status the real API uses:
400 for an invalid request (FastAPI's 422 is turned into 400, as OpenAI does), 401 for a
missing or wrong key, 404 for an unknown id or model, 413 for a body over the limit, 500
(``server_error``) for an error no route expected, logged with its traceback, on a
connection that stays open for the client's next request.

Models served: the backend's ``default_model`` (the hf backend's ``smollm2-135m`` alias or
``--model``) and every fine-tuned ``ft:...`` name this server made. A name reaches the
backend only after it has been looked up here, because the backend treats a model reference
as a hub id or a directory: a client string must never become a path. Embeddings come from
the backend's one embedder whichever served model is named.

Routes are plain ``def`` functions, run on FastAPI's thread pool, so a long generation never
blocks the event loop. Backend calls take one lock (the protocol promises no thread
safety; the hf backend trains and generates on the same in-memory model): while a job
trains, chat and embedding requests wait for it, and everything else answers at once.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import (APIRouter, BackgroundTasks, Depends, FastAPI, Form, Header, Query,
                     Request, UploadFile)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException

from .chat import choice, cut_at_stop, embedding_rows, together_dialect
from .jobs import Trainer
from .schemas import ChatRequest, EmbeddingRequest, Hyperparameters, JobCreate
from .store import (DamagedRecord, IdempotencyConflict, Store, describe, new_id, now,
                    public)
from ..chatfile import MIN_EXAMPLES

log = logging.getLogger("semievol.server")

ORGANIZATION = "semievol"
PURPOSES = ("fine-tune", "batch")
DEFAULT_MAX_TOKENS = 256
"""Completion length when a request names none (OpenAI's default is the model's limit)."""
JSON_BODY_LIMIT = 16 * 2**20
UPLOAD_PATHS = ("/v1/files", "/v1/files/upload")
"""Where a body may be as large as an upload (OpenAI's path, Together's)."""
MAX_IDEMPOTENCY_KEY = 255
"""The longest ``Idempotency-Key`` taken (Stripe's limit; longer ones are refused with 400)."""
IdempotencyKey = Annotated[str | None, Header(max_length=MAX_IDEMPOTENCY_KEY)]


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        self.status, self.message, self.param, self.code, self.type = \
            status, message, param, code, type
        super().__init__(message)

    def response(self) -> JSONResponse:
        return _error(self.status, self.message, param=self.param, code=self.code,
                      type=self.type)


@dataclass
class Server:
    """What every route needs: the backend, its lock, the state and the settings."""

    backend: object
    store: Store
    trainer: Trainer
    backend_lock: threading.Lock
    api_key: str | None
    max_upload_bytes: int
    dedicated_lora: bool = False
    """Serve the LoRA fine-tunes made in Together's dialect only on a dedicated endpoint
    (as api.together.ai does for some base models), refusing them by name."""
    started: int = field(default_factory=now)

    @property
    def fingerprint(self) -> str:
        """``system_fingerprint``: changes when the backend or its base model does."""
        from .. import __version__

        seed = f"{self.backend.name}:{self.backend.default_model}:{__version__}"
        return "fp_" + hashlib.sha256(seed.encode()).hexdigest()[:10]

    def resolve(self, name: str) -> str:
        """The backend reference of a served model name, or a 404 ``model_not_found``."""
        if name == self.backend.default_model:
            return name
        entry = self.store.model(name)
        if entry is None:  # a started dedicated endpoint (Together's dialect) by its name
            served = [e for e in self.store.endpoints() if e["name"] == name]
            if not served or served[0]["state"] != "STARTED":
                raise _model_not_found(name)
            return served[0]["ref"]
        if self.dedicated_lora and not name.startswith("ft:"):
            raise ApiError(400, f"Unable to access non-serverless model {name}. Please "
                           f"visit https://api.together.ai/models/{name} to create and "
                           "start a new dedicated endpoint for the model.",
                           code="model_not_available")
        return entry["ref"]


def create_app(backend, state_dir: str | Path, api_key: str | None = None, *,
               max_upload_mb: int = 512, min_examples: int = MIN_EXAMPLES,
               dedicated_lora: bool = False,
               dialects: tuple[APIRouter, ...] = ()) -> FastAPI:
    """The ASGI app serving ``backend`` with its state in ``state_dir``: OpenAI's dialect,
    and the routes of other ``dialects`` built on the helpers here (Together's).

    ``api_key``: when set, every request needs ``Authorization: Bearer <api_key>``.
    ``max_upload_mb``: the largest file ``POST /v1/files`` takes. ``min_examples``: the
    fewest training examples a job accepts (OpenAI's 10). ``dedicated_lora``: see
    :attr:`Server.dedicated_lora`. The fine-tuning worker starts
    with the app (its lifespan) and first recovers the jobs a stopped server left."""
    store = Store(state_dir)
    lock = threading.Lock()
    server = Server(backend, store, Trainer(store, backend, lock, min_examples=min_examples),
                    lock, api_key, max_upload_mb * 2**20, dedicated_lora)

    @asynccontextmanager
    async def lifespan(app):
        server.trainer.start()
        yield
        server.trainer.stop()

    app = FastAPI(title="semievol OpenAI-compatible API", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    for routes in (router, *dialects):
        app.include_router(routes)
    app.add_exception_handler(ApiError, lambda request, e: e.response())
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(DamagedRecord, _damaged)
    app.add_middleware(ServerErrors)
    app.add_middleware(BodyLimit, upload_limit=server.max_upload_bytes)
    app.add_middleware(Authorize, api_key=api_key)  # the outermost: runs first
    return app


# -- plumbing: auth, errors, body size ----------------------------------------------------
def _server(request: Request) -> Server:
    return request.app.state.server


def authorize(request: Request) -> None:
    problem = _auth_problem(request.headers.get("authorization", ""), _server(request).api_key,
                            request.headers.get("x-api-key", ""))
    if problem is not None:
        raise problem


def _auth_problem(header: str, key: str | None, api_key_header: str = "") -> ApiError | None:
    """Why an ``Authorization`` header (or, without one, an ``X-API-Key`` header: the
    Tinker SDK's) does not carry the server's key (None: it does)."""
    if key is None:
        return None
    if not header and api_key_header:
        if hmac.compare_digest(api_key_header.strip().encode(), key.encode()):
            return None
        return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    if not header:
        return ApiError(401, "You didn't provide an API key. You need to provide your API key "
                        "in an Authorization header using Bearer auth (i.e. Authorization: "
                        "Bearer YOUR_KEY).")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             key.encode()):
        return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return None


class Authorize:
    """Check the bearer key from the request's headers before anything reads its body: an
    unauthenticated client is answered 401 at once, and never makes the server read or
    spool an upload. (The routes check again, as a dependency.)"""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            problem = _auth_problem(headers.get(b"authorization", b"").decode("latin-1"),
                                    self.api_key,
                                    headers.get(b"x-api-key", b"").decode("latin-1"))
            if problem is not None:
                return await problem.response()(scope, receive, send)
        await self.app(scope, receive, send)


ServerDep = Annotated[Server, Depends(_server)]
router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])


def _error(status: int, message: str, *, param=None, code=None,
           type: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param,
                                   "code": code}}, status_code=status)


def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return _error(400, "We could not parse the JSON body of your request. (HINT: This "
                      "likely means you aren't using your HTTP library correctly.)")
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    if first["type"] == "missing":
        return _error(400, f"Missing required parameter: '{param}'.", param=param,
                      code="missing_required_parameter")
    return _error(400, f"Invalid value for '{param}': {first['msg']}.", param=param,
                  code="invalid_value")


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code in (404, 405):
        return _error(exc.status_code,
                      f"Invalid URL ({request.method} {request.url.path})")
    return _error(exc.status_code, str(exc.detail))


def _damaged(request: Request, exc: DamagedRecord) -> JSONResponse:
    log.error("%s (serving %s %s)", exc, request.method, request.url.path)
    return _error(500, f"The server's state is damaged: {exc}.", type="server_error")


class ServerErrors:
    """Answer an exception that no route expected with OpenAI's 500 body, log it with its
    traceback (an OSError, the disk's doing, in one line that names the path the client is
    not shown), and keep the connection. (A handler for ``Exception`` would sit on
    Starlette's ServerErrorMiddleware, which raises again after answering; uvicorn then
    closes the keep-alive connection, and the client's next request on it is reset.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            if started:  # too late for an error body: uvicorn ends the connection
                raise
            if isinstance(e, OSError):  # the disk: one line that says what and where
                log.error("%s %s failed: %s", scope["method"], scope["path"], e)
            else:
                log.exception("error serving %s %s", scope["method"], scope["path"])
            response = _error(500, "The server had an error while processing your request: "
                              f"{describe(e)}", type="server_error")
            await response(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over the limit with 413 before they are read into memory or
    spooled to disk: by ``Content-Length`` at once, and by counting while they stream."""

    def __init__(self, app, upload_limit: int):
        self.app, self.upload_limit = app, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = (self.upload_limit + 2**16 if scope["path"].rstrip("/") in UPLOAD_PATHS
                 else JSON_BODY_LIMIT)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return await _too_large(limit)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, _too_large_message(limit))
            return message

        await self.app(scope, counted, send)


def _too_large_message(limit: int) -> str:
    return f"Request body too large: the limit is {limit // 2**20} MB."


def _too_large(limit: int) -> JSONResponse:
    return _error(413, _too_large_message(limit))


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    """OpenAI's cursor page: the ``limit`` items that follow the one with id ``after``."""
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(400, f"Invalid 'after': no object with id '{after}'.",
                           param="after")
        items = items[ids.index(after) + 1:]
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


# -- files -------------------------------------------------------------------------------
@router.post("/files")
def upload_file(server: ServerDep, file: UploadFile, purpose: Annotated[str, Form()]):
    return save_upload(server, file, purpose, file.filename)


def save_upload(server: Server, file: UploadFile, purpose: str, filename: str | None) -> dict:
    """Stream an uploaded file into the store (refused over the size limit); its record."""
    if purpose not in PURPOSES:
        raise ApiError(400, f"Invalid value for 'purpose': '{purpose}' is not one of "
                       f"{list(PURPOSES)}.", param="purpose", code="invalid_value")
    file_id = new_id("file")
    fd, tmp = tempfile.mkstemp(dir=server.store.files_dir, prefix=".upload-")
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := file.file.read(2**20):
                size += len(chunk)
                if size > server.max_upload_bytes:
                    raise ApiError(413, f"File too large: the limit is "
                                   f"{server.max_upload_bytes // 2**20} MB.", param="file")
                out.write(chunk)
        return server.store.add_file(file_id, Path(tmp), filename=(filename or
                                     "upload")[:255], purpose=purpose)
    finally:
        Path(tmp).unlink(missing_ok=True)


@router.get("/files")
def list_files(server: ServerDep, purpose: str | None = None,
               limit: Annotated[int, Query(ge=1, le=10000)] = 10000, after: str | None = None):
    files = [f for f in server.store.files() if purpose is None or f["purpose"] == purpose]
    page = _page(files, after, limit)
    ids = [f["id"] for f in page["data"]]
    return {**page, "first_id": ids[0] if ids else None, "last_id": ids[-1] if ids else None}


def _file(server: Server, file_id: str) -> dict:
    record = server.store.file(file_id)
    if record is None:
        raise ApiError(404, f"No such File object: {file_id}", param="id")
    return record


@router.get("/files/{file_id}")
def get_file(server: ServerDep, file_id: str):
    return _file(server, file_id)


@router.get("/files/{file_id}/content")
def file_content(server: ServerDep, file_id: str):
    record = _file(server, file_id)
    return FileResponse(server.store.file_path(record["id"]),
                        media_type="application/octet-stream")


@router.delete("/files/{file_id}")
def delete_file(server: ServerDep, file_id: str):
    if not server.store.delete_file(file_id):
        raise ApiError(404, f"No such File object: {file_id}", param="id")
    return {"id": file_id, "object": "file", "deleted": True}


# -- fine-tuning jobs --------------------------------------------------------------------
@router.post("/fine_tuning/jobs")
def create_job(server: ServerDep, body: JobCreate, background: BackgroundTasks,
               idempotency_key: IdempotencyKey = None):
    """Record the job as ``validating_files`` and answer; its files are validated right
    after the response, then it waits for the worker."""
    if body.method is not None and body.method.type != "supervised":
        raise ApiError(400, f"Fine-tuning method '{body.method.type}' is not supported by "
                       "this server; use 'supervised'.", param="method.type",
                       code="invalid_value")
    if body.method is not None and body.hyperparameters is not None:
        raise ApiError(400, "Specify hyperparameters in 'method' or at the top level, not "
                       "both.", param="hyperparameters")
    if body.integrations:
        raise ApiError(400, "Integrations are not supported by this server.",
                       param="integrations")
    requested = (body.method.supervised or Hyperparameters()).hyperparameters \
        if body.method is not None else (body.hyperparameters or Hyperparameters())
    record = submit_job(server, background, model=body.model, training_file=body.training_file,
                        validation_file=body.validation_file,
                        hyperparameters=requested.model_dump(), seed=body.seed,
                        suffix=body.suffix, metadata=body.metadata,
                        name=lambda root, job_id: f"ft:{root}:{ORGANIZATION}:"
                                                  f"{body.suffix or ''}:{job_id[6:14]}",
                        idempotency_key=idempotency_key)
    return public(record)


def submit_job(server: Server, background: BackgroundTasks, *, model: str, training_file: str,
               validation_file: str | None, hyperparameters: dict, seed: int | None,
               suffix: str | None, name, metadata: dict | None = None,
               private: dict | None = None, idempotency_key: str | None = None) -> dict:
    """Check a job's model and files, record it as ``validating_files`` and validate its
    files right after the response (then it waits for the worker). The one path by which
    every dialect creates a job: ``hyperparameters`` are OpenAI's (``"auto"`` allowed),
    ``name(root model, job id)`` is the model it will make, ``private`` extra ``_`` keys
    (``_finetune``: FinetuneConfig fields that override the OpenAI mapping).

    With an ``Idempotency-Key``, the first request with that key makes the job and every
    later one (concurrent, retried, after a restart) gets that same job as it was created;
    the key with another request is refused with 422, as the IETF Idempotency-Key draft
    has it. Keys are at most :data:`MAX_IDEMPOTENCY_KEY` characters (the routes check)."""
    request = {"model": model, "training_file": training_file, "validation_file":
               validation_file, "hyperparameters": hyperparameters, "seed": seed,
               "suffix": suffix, "metadata": metadata, "private": private}
    made = []

    def make() -> dict:
        made.append(_new_job(server, request, name))
        return made[0]

    if idempotency_key is None:
        record = make()
    else:
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        try:
            record = server.store.idempotent("fine-tuning jobs", idempotency_key, digest, make)
        except IdempotencyConflict:
            raise ApiError(422, "This Idempotency-Key was already used with a different "
                           "request; use a new key for a new job.",
                           code="idempotency_key_reused") from None
    if made:  # a new job: validate its files after the response
        background.add_task(server.trainer.validate, record["id"])
    return record


def _new_job(server: Server, request: dict, name) -> dict:
    """Check the job's model and files and record it (``validating_files``)."""
    model, training_file = request["model"], request["training_file"]
    validation_file, hyperparameters = request["validation_file"], request["hyperparameters"]
    seed, suffix = request["seed"], request["suffix"]
    base_ref, root = _fine_tunable(server, model)
    for param, file_id in (("training_file", training_file),
                           ("validation_file", validation_file)):
        if file_id is None:
            continue
        record = server.store.file(file_id)
        if record is None:
            raise ApiError(400, f"Invalid file id '{file_id}': no such file.", param=param,
                           code="invalid_file_id")
        if record["purpose"] != "fine-tune":
            raise ApiError(400, f"File {file_id} has purpose '{record['purpose']}'; "
                           "fine-tuning needs purpose 'fine-tune'.", param=param,
                           code="invalid_file_purpose")
    job_id = new_id("ftjob")
    record = {
        "object": "fine_tuning.job", "id": job_id, "model": model,
        "created_at": now(), "error": None, "fine_tuned_model": None, "finished_at": None,
        "hyperparameters": hyperparameters,
        "method": {"type": "supervised",
                   "supervised": {"hyperparameters": hyperparameters}},
        "organization_id": f"org-{ORGANIZATION}", "result_files": [],
        "seed": seed if seed is not None else secrets.randbelow(2**31),
        "status": "validating_files", "trained_tokens": None,
        "training_file": training_file, "validation_file": validation_file,
        "integrations": None, "estimated_finish": None, "metadata": request["metadata"],
        "user_provided_suffix": suffix,
        "_requested_hyperparameters": hyperparameters, "_base_ref": base_ref,
        "_root_model": root, "_fine_tuned_model": name(root, job_id),
        **(request["private"] or {}),
    }
    server.store.add_job(record)
    server.store.add_event(job_id, f"Created fine-tuning job: {job_id}")
    server.store.add_event(job_id, f"Validating training file: {training_file}")
    return record


def _fine_tunable(server: Server, name: str) -> tuple[str, str]:
    """(backend reference, plain base model name) of a model a job may start from."""
    if name == server.backend.default_model:
        return name, name
    entry = server.store.model(name)
    if entry is None:
        raise ApiError(400, f"Model {name} is not available for fine-tuning or does not "
                       "exist.", param="model", code="model_not_available")
    return entry["ref"], entry["base"]


@router.get("/fine_tuning/jobs")
def list_jobs(server: ServerDep, request: Request, after: str | None = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20):
    """Newest first. ``metadata[k]=v`` keeps jobs whose metadata has every such pair;
    ``metadata=null`` keeps jobs without metadata."""
    wanted = {key[9:-1]: value for key, value in request.query_params.multi_items()
              if key.startswith("metadata[") and key.endswith("]")}
    no_metadata = request.query_params.get("metadata") == "null"
    jobs = [public(j) for j in server.store.jobs()
            if (not no_metadata or not j["metadata"])
            and all((j["metadata"] or {}).get(k) == v for k, v in wanted.items())]
    return _page(jobs, after, limit)


def job_or_404(server: Server, job_id: str) -> dict:
    record = server.store.job(job_id)
    if record is None:
        raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id",
                       code="fine_tuning_job_not_found")
    return record


@router.get("/fine_tuning/jobs/{job_id}")
def get_job(server: ServerDep, job_id: str):
    return public(job_or_404(server, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(server: ServerDep, job_id: str):
    record = job_or_404(server, job_id)
    cancelled = server.trainer.cancel(job_id)
    if cancelled is None:
        raise ApiError(400, f"Job {job_id} has already {record['status']}; it cannot be "
                       "cancelled.", param="fine_tuning_job_id")
    return public(cancelled)


@router.get("/fine_tuning/jobs/{job_id}/events")
def job_events(server: ServerDep, job_id: str, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 20):
    job_or_404(server, job_id)
    return _page(server.store.events(job_id), after, limit)


# -- inference ---------------------------------------------------------------------------
@router.post("/chat/completions")
def chat_completions(server: ServerDep, body: ChatRequest):
    """Generate with the backend, then shape it as OpenAI does (see ``chat.py`` for stop
    sequences and logprobs). ``usage.prompt_tokens`` is the backend's own count (its
    tokenizer's, as the call reports it), counted once however large ``n`` is."""
    if body.stream:
        raise ApiError(400, "Streaming is not supported by this server.", param="stream")
    if body.top_logprobs is not None and body.logprobs is not True:
        raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true.",
                       param="top_logprobs")
    ref = server.resolve(body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    n = body.n or 1
    with server.backend_lock:
        result = server.backend.generate_with_logprobs(
            ref, [messages], n=n,
            temperature=1.0 if body.temperature is None else body.temperature,
            max_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
            seed=body.seed)
    generations = [cut_at_stop(g, stops) for g in result[0]]
    prompt_tokens = result.usage.prompt_tokens or _words(m["content"] for m in messages)
    completion_tokens = sum(len(g.tokens) for g in generations)
    return {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion",
            "created": int(time.time()), "model": body.model,
            "system_fingerprint": server.fingerprint, "service_tier": "default",
            "choices": [choice(i, g, logprobs=body.logprobs) for i, g in enumerate(generations)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            **({"prompt": []} if together_dialect(body.logprobs) else {})}


@router.post("/embeddings")
def embeddings(server: ServerDep, body: EmbeddingRequest):
    """The backend's embeddings of the input strings, with the tokens the backend reports
    (words where it reports none); token-id input is refused."""
    server.resolve(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "Token-id input is not supported by this server; send strings.",
                       param="input")
    if not all(texts):
        raise ApiError(400, "'input' cannot contain an empty string.", param="input")
    with server.backend_lock:
        vectors = server.backend.embed(texts)
    if body.dimensions is not None and body.dimensions > vectors.shape[1]:
        raise ApiError(400, f"'dimensions' must be at most {vectors.shape[1]} for this "
                       "model.", param="dimensions")
    tokens = vectors.usage.prompt_tokens or _words(texts)
    return {"object": "list", "model": body.model,
            "data": embedding_rows(vectors, encoding_format=body.encoding_format,
                                   dimensions=body.dimensions),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _words(texts) -> int:
    return sum(len(re.findall(r"\S+", t)) for t in texts)


# -- models ------------------------------------------------------------------------------
def _models(server: Server) -> list[dict]:
    served = [{"id": server.backend.default_model, "object": "model",
               "created": server.started, "owned_by": ORGANIZATION}]
    served += [{"id": name, "object": "model", "created": entry["created"],
                "owned_by": f"org-{ORGANIZATION}"}
               for name, entry in server.store.models().items()]
    return served


@router.get("/models")
def list_models(server: ServerDep):
    return {"object": "list", "data": _models(server)}


@router.get("/models/{model:path}")
def get_model(server: ServerDep, model: str):
    for entry in _models(server):
        if entry["id"] == model:
            return entry
    raise _model_not_found(model)


def _model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist or you do not have access to "
                    "it.", code="model_not_found")
