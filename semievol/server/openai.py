"""OpenAI's dialect: the part of the OpenAI API that fine-tuning workflows use, over the
shared job service (request bodies: ``schemas.py``; choices and embedding rows: ``chat.py``).

    POST /v1/files   GET /v1/files   GET|DELETE /v1/files/{id}   GET /v1/files/{id}/content
    POST /v1/fine_tuning/jobs   GET /v1/fine_tuning/jobs   GET /v1/fine_tuning/jobs/{id}
    POST /v1/fine_tuning/jobs/{id}/cancel   GET /v1/fine_tuning/jobs/{id}/events
    POST /v1/chat/completions   POST /v1/embeddings   GET /v1/models   GET /v1/models/{id}

404 for an unknown id or model, with OpenAI's codes. Models served: the backend's
``default_model`` (the hf backend's ``smollm2-135m`` alias or ``--model``) and every
fine-tuned model this server made, looked up by :func:`~semievol.server.service.resolve`
(other dialects' hooks included). Embeddings come from the backend's one embedder whichever
served model is named. Chat and embeddings are OpenAI's routes for every dialect: a chat
answer goes through each dialect's ``chat`` hook, which reshapes it for a request in its
dialect (Together's integer ``logprobs``).

Routes are plain ``def`` functions, run on FastAPI's thread pool, so a long generation never
blocks the event loop. Backend calls take one lock (the protocol promises no thread
safety; the hf backend trains and generates on the same in-memory model): while a job
trains, chat and embedding requests wait for it, and everything else answers at once.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Depends, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from .chat import choice, cut_at_stop, embedding_rows
from .http import ApiError, Dialect, Server, ServerDep, authorize
from .schemas import ChatRequest, EmbeddingRequest, Hyperparameters, JobCreate
from .service import (ORGANIZATION, IdempotencyKey, cancel, job_or_404, model_not_found,
                      resolve, save_upload, submit_job)
from .store import public

DEFAULT_MAX_TOKENS = 256
"""Completion length when a request names none (OpenAI's default is the model's limit)."""

router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])


def dialect() -> Dialect:
    return Dialect(router, upload_paths=("/v1/files",))


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


@router.get("/fine_tuning/jobs/{job_id}")
def get_job(server: ServerDep, job_id: str):
    return public(job_or_404(server, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(server: ServerDep, job_id: str):
    return public(cancel(server, job_id, _finished))


def _finished(job: dict) -> ApiError:
    return ApiError(400, f"Job {job['id']} has already {job['status']}; it cannot be "
                    "cancelled.", param="fine_tuning_job_id")


@router.get("/fine_tuning/jobs/{job_id}/events")
def job_events(server: ServerDep, job_id: str, after: str | None = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 20):
    job_or_404(server, job_id)
    return _page(server.store.events(job_id), after, limit)


# -- inference ---------------------------------------------------------------------------
@router.post("/chat/completions")
def chat_completions(server: ServerDep, body: ChatRequest):
    """Generate with the backend, then shape it as OpenAI does (see ``chat.py`` for stop
    sequences and logprobs), or as the request's dialect does. ``usage.prompt_tokens`` is
    the backend's own count (its tokenizer's, as the call reports it), counted once however
    large ``n`` is."""
    if body.stream:
        raise ApiError(400, "Streaming is not supported by this server.", param="stream")
    if body.top_logprobs is not None and body.logprobs is not True:
        raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true.",
                       param="top_logprobs")
    ref = resolve(server, body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    with server.backend_lock:
        result = server.backend.generate_with_logprobs(
            ref, [messages], n=body.n or 1,
            temperature=1.0 if body.temperature is None else body.temperature,
            max_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
            seed=body.seed)
    generations = [cut_at_stop(g, stops) for g in result[0]]
    prompt_tokens = result.usage.prompt_tokens or _words(m["content"] for m in messages)
    completion_tokens = sum(len(g.tokens) for g in generations)
    answer = {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion",
              "created": int(time.time()), "model": body.model,
              "system_fingerprint": _fingerprint(server), "service_tier": "default",
              "choices": [choice(i, g, logprobs=body.logprobs)
                          for i, g in enumerate(generations)],
              "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens}}
    for other in server.dialects:
        if other.chat is not None:
            answer = other.chat(body, generations, answer)
    return answer


def _fingerprint(server: Server) -> str:
    """``system_fingerprint``: changes when the backend or its base model does."""
    from .. import __version__

    seed = f"{server.backend.name}:{server.backend.default_model}:{__version__}"
    return "fp_" + hashlib.sha256(seed.encode()).hexdigest()[:10]


@router.post("/embeddings")
def embeddings(server: ServerDep, body: EmbeddingRequest):
    """The backend's embeddings of the input strings, with the tokens the backend reports
    (words where it reports none); token-id input is refused."""
    resolve(server, body.model)
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
    raise model_not_found(model)
