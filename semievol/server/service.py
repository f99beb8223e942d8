"""The job service every dialect shares: upload a file, submit a fine-tuning job, resolve a
model name to the backend's reference. It knows no dialect: each route maps its own
request onto these calls and shows the record in its own shape.

A job's record is OpenAI's fine-tuning job object (``public(record)`` is what OpenAI's
dialect answers) plus private ``_`` keys that the API never shows:

    _requested_hyperparameters   as asked ("auto" allowed); resolved once the files are read
    _base_ref, _root_model       the backend reference it trains from, and its base model name
    _fine_tuned_model            the name of the model it will make
    _finetune                    FinetuneConfig fields that override OpenAI's mapping
    _min_examples                the fewest training examples it takes (else the server's)
    ...                          a dialect's own keys, which only that dialect reads

Model names: the backend's ``default_model`` and every fine-tuned model this server made
are served; a dialect may serve more names, or refuse some, by its ``resolve`` hook. A name
reaches the backend only after it has been looked up here, because the backend treats a
model reference as a hub id or a directory: a client string must never become a path.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import BackgroundTasks, Header, UploadFile

from .http import ApiError, Server
from .store import IdempotencyConflict, new_id, now

ORGANIZATION = "semievol"
PURPOSES = ("fine-tune", "batch")
MAX_IDEMPOTENCY_KEY = 255
"""The longest ``Idempotency-Key`` taken (Stripe's limit; longer ones are refused with 400)."""
IdempotencyKey = Annotated[str | None, Header(max_length=MAX_IDEMPOTENCY_KEY)]
"""A route's ``Idempotency-Key`` header, checked against :data:`MAX_IDEMPOTENCY_KEY`."""


# -- files -------------------------------------------------------------------------------
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


# -- jobs --------------------------------------------------------------------------------
def submit_job(server: Server, background: BackgroundTasks, *, model: str, training_file: str,
               validation_file: str | None, hyperparameters: dict, seed: int | None,
               suffix: str | None, name, metadata: dict | None = None,
               finetune: dict | None = None, min_examples: int | None = None,
               private: dict | None = None, idempotency_key: str | None = None) -> dict:
    """Check a job's model and files, record it as ``validating_files`` and validate its
    files right after the response (then it waits for the worker). The one path by which
    every dialect creates a job: ``hyperparameters`` are OpenAI's (``"auto"`` allowed),
    ``name(root model, job id)`` is the model it will make, ``finetune`` and
    ``min_examples`` override the mapping and the minimum for this job, and ``private``
    holds the dialect's own ``_`` keys.

    With an ``Idempotency-Key``, the first request with that key makes the job and every
    later one (concurrent, retried, after a restart) gets that same job as it was created;
    the key with another request is refused with 422, as the IETF Idempotency-Key draft
    has it. Keys are at most :data:`MAX_IDEMPOTENCY_KEY` characters (the routes check)."""
    own = {"_finetune": finetune, "_min_examples": min_examples}
    private = {**{k: v for k, v in own.items() if v is not None}, **(private or {})} or None
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


def job_or_404(server: Server, job_id: str) -> dict:
    record = server.store.job(job_id)
    if record is None:
        raise ApiError(404, f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id",
                       code="fine_tuning_job_not_found")
    return record


def cancel(server: Server, job_id: str, refusal) -> dict:
    """Cancel a job that has not finished: the job as cancelled. A job that has finished:
    the :class:`ApiError` ``refusal(job)`` is raised (each dialect words its own)."""
    record = job_or_404(server, job_id)
    cancelled = server.trainer.cancel(job_id)
    if cancelled is None:
        raise refusal(record)
    return cancelled


# -- models ------------------------------------------------------------------------------
def resolve(server: Server, name: str) -> str:
    """The backend reference of a served model name, or a 404 ``model_not_found``. Each
    dialect's ``resolve`` hook is asked first (see :class:`~semievol.server.http.Dialect`)."""
    if name == server.backend.default_model:
        return name
    entry = server.store.model(name)
    for dialect in server.dialects:
        if dialect.resolve is not None and \
                (ref := dialect.resolve(server, name, entry)) is not None:
            return ref
    if entry is None:
        raise model_not_found(name)
    return entry["ref"]


def model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist or you do not have access to "
                    "it.", code="model_not_found")
