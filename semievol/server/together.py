"""Together's dialect of the API, served beside OpenAI's on the same port (no flag): a
client of either finds its paths, over one store, one trainer and one backend.

    POST /v1/files/upload                     (multipart: file, file_name, purpose)
    POST /v1/fine-tunes   GET /v1/fine-tunes   GET /v1/fine-tunes/{id}
    POST /v1/fine-tunes/{id}/cancel   GET /v1/fine-tunes/{id}/events
    GET /v1/fine-tunes/models/limits   POST /v1/fine-tunes/estimate-price
    GET /v1/hardware   POST /v1/endpoints   GET /v1/endpoints
    GET|PATCH|DELETE /v1/endpoints/{id}

Chat completions and embeddings are OpenAI's routes; this module's hooks into them
(:func:`dialect`) answer a chat request with an integer ``logprobs`` in Together's shape and
serve the names of its dedicated endpoints. A Together job is a job of the store like any
other (so each dialect lists every job), created through
:func:`~semievol.server.service.submit_job`; this module only maps Together's request onto
it and shows the record in Together's shape:

- ``learning_rate``, ``training_type.lora_r`` / ``lora_alpha`` / ``lora_dropout``,
  ``warmup_ratio`` and the scheduler go to the backend's FinetuneConfig as given;
  ``batch_size: "max"`` is the OpenAI mapping's "auto"; ``random_seed`` is the seed.
- ``from_checkpoint`` (a job id or an output model name made here, an optional ``:step``
  ignored: only the final checkpoint is kept) continues that model, as ``model`` of an
  OpenAI job does with an ``ft:`` name.
- Status: pending (validating files), queued, running, completed, error, cancelled.
- The model made is ``semievol/<base>-<suffix>-<8 characters of the job id>``.
- Dedicated endpoints serve a model made here (or the base model) under the endpoint's own
  name once STARTED: a new one is PENDING until it is first read back, as a real one takes a
  while to start. One hardware is listed, ``local`` at 0 cents a minute. With ``serve
  --dedicated-lora`` the fine-tunes are refused by name, with Together's message, and served
  only through an endpoint.
- Full training, DPO, validation files, evaluations and W&B are refused or ignored; the
  price estimate is 0 dollars (a local model) with a word count as its token count.
"""
from __future__ import annotations

import re
import uuid
from datetime import datetime, timezone
from typing import Annotated, Literal

from functools import partial

from fastapi import APIRouter, BackgroundTasks, Depends, Form, Query, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from ..config import FinetuneConfig
from ..types import Generation
from .chat import finish_reason
from .http import ApiError, Dialect, Server, ServerDep, authorize
from .jobs import BASE_LEARNING_RATE
from .service import (ORGANIZATION, IdempotencyKey, cancel, job_or_404, save_upload,
                      submit_job)
from .store import now

router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

STATUS = {"validating_files": "pending", "queued": "queued", "running": "running",
          "succeeded": "completed", "failed": "error", "cancelled": "cancelled"}
EVENT_TYPES = {"error": "job_error", "warn": "warning"}
"""Together's event type of a store event, by level (the store keeps no finer type)."""
MAX_EPOCHS, MAX_BATCH, MAX_RANK = 50, 256, 64
MIN_SAMPLES = 1
"""Together's fewest training examples (its SDK's ``MIN_SAMPLES``), not OpenAI's 10."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LoRA(_Body):
    type: Literal["Lora", "Full"]
    lora_r: Annotated[int, Field(ge=1, le=MAX_RANK)] | None = None
    lora_alpha: Annotated[int, Field(ge=1)] | None = None
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0


class Method(_Body):
    method: Literal["sft", "dpo"] = "sft"


class Scheduler(_Body):
    lr_scheduler_type: Literal["linear", "cosine"] = "cosine"


class FineTuneCreate(_Body):
    training_file: str = Field(min_length=1, max_length=128)
    model: str | None = Field(None, min_length=1, max_length=256)
    from_checkpoint: str | None = Field(None, min_length=1, max_length=256)
    n_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 1
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] | Literal["max"] = "max"
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 1e-5
    warmup_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    lr_scheduler: Scheduler | None = None
    training_type: LoRA | None = None
    training_method: Method | None = None
    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9._-]*$")
    random_seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None


class PriceRequest(_Body):
    training_file: str = Field(min_length=1, max_length=128)
    model: str | None = None
    from_checkpoint: str | None = None
    n_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = 1


# -- files --------------------------------------------------------------------------------
@router.post("/files/upload")
def upload(server: ServerDep, file: UploadFile, purpose: Annotated[str, Form()],
           file_name: Annotated[str, Form()],
           file_type: Annotated[Literal["jsonl"] | None, Form()] = None):
    record = save_upload(server, file, purpose, file_name)
    return {"id": record["id"], "object": "file", "created_at": record["created_at"],
            "filename": record["filename"], "bytes": record["bytes"],
            "purpose": record["purpose"], "FileType": "jsonl", "Processed": True}


# -- fine-tunes ---------------------------------------------------------------------------
@router.post("/fine-tunes")
def create(server: ServerDep, body: FineTuneCreate, background: BackgroundTasks,
           idempotency_key: IdempotencyKey = None):
    lora = body.training_type or LoRA(type="Lora")
    if lora.type != "Lora":
        raise ApiError(400, "Full fine-tuning is not supported by this server; use "
                       "training_type Lora.", param="training_type")
    if body.training_method is not None and body.training_method.method != "sft":
        raise ApiError(400, "Only the 'sft' training method is supported by this server.",
                       param="training_method")
    if (body.model is None) == (body.from_checkpoint is None):
        raise ApiError(400, "Specify either a model or a checkpoint to start from.",
                       param="model")
    model = _checkpoint(server, body.from_checkpoint) if body.from_checkpoint else body.model
    rank = lora.lora_r or FinetuneConfig().lora_rank
    finetune = {"learning_rate": body.learning_rate, "lora_rank": rank,
                "lora_alpha": lora.lora_alpha or 2 * rank, "lora_dropout": lora.lora_dropout,
                "warmup_ratio": min(body.warmup_ratio, 0.99),
                "lr_scheduler": (body.lr_scheduler or Scheduler()).lr_scheduler_type}
    hyper = {"n_epochs": body.n_epochs, "batch_size": "auto" if body.batch_size == "max"
             else body.batch_size, "learning_rate_multiplier": body.learning_rate
             / BASE_LEARNING_RATE}
    suffix = body.suffix or None
    record = submit_job(
        server, background, model=model, training_file=body.training_file,
        validation_file=None, hyperparameters=hyper, seed=body.random_seed, suffix=suffix,
        name=lambda root, job_id: f"{ORGANIZATION}/{root.split('/')[-1]}"
                                  f"{'-' + suffix if suffix else ''}-{job_id[6:14]}",
        finetune=finetune, min_examples=MIN_SAMPLES,
        private={"_from_checkpoint": body.from_checkpoint}, idempotency_key=idempotency_key)
    return job_view(record)


def _checkpoint(server: Server, checkpoint: str) -> str:
    """The served model a ``from_checkpoint`` names: a job's output (by job id) or an
    output model name; ``:step`` is ignored (only the final checkpoint is kept)."""
    name = re.sub(r":\d+$", "", checkpoint)
    job = server.store.job(name)
    if job is not None:
        if job["status"] != "succeeded":
            raise ApiError(400, f"Job {name} has no checkpoint: it is {job['status']}.",
                           param="from_checkpoint")
        return job["fine_tuned_model"]
    if server.store.model(name) is None:
        raise ApiError(400, f"No checkpoint '{checkpoint}': not a job or a model made here.",
                       param="from_checkpoint", code="invalid_checkpoint")
    return name


@router.get("/fine-tunes")
def list_jobs(server: ServerDep):
    return {"data": [job_view(j) for j in server.store.jobs()]}


@router.get("/fine-tunes/{job_id}")
def retrieve(server: ServerDep, job_id: str):
    return job_view(job_or_404(server, job_id))


@router.get("/fine-tunes/models/limits")
def limits(server: ServerDep, model_name: Annotated[str, Query(min_length=1)]):
    """What this server takes for a model it can fine-tune (the OpenAI dialect's bounds)."""
    if model_name != server.backend.default_model and server.store.model(model_name) is None:
        raise ApiError(404, f"Model {model_name} is not available for fine-tuning.",
                       param="model_name", code="model_not_available")
    config = FinetuneConfig()
    return {"model_name": model_name, "default_gradient_accumulation_steps": 1,
            "lora_training": {"default_rank": config.lora_rank, "max_rank": MAX_RANK,
                              "min_batch_size": 1, "max_batch_size": MAX_BATCH,
                              "max_batch_size_dpo": 0, "target_modules": ["all-linear"]},
            "full_training": None, "supports_full_training": False,
            "min_learning_rate": 1e-7, "max_learning_rate": 1.0,
            "max_num_epochs": MAX_EPOCHS, "max_num_checkpoints": 1, "max_num_evals": 0,
            "max_seq_length_sft": config.max_length, "max_seq_length_dpo": 0,
            "min_max_seq_length": 8, "merge_output_lora": False, "supports_reasoning": False,
            "supports_tools": False, "supports_vision": False}


@router.post("/fine-tunes/estimate-price")
def estimate_price(server: ServerDep, body: PriceRequest):
    record = server.store.file(body.training_file)
    if record is None:
        raise ApiError(400, f"Invalid file id '{body.training_file}': no such file.",
                       param="training_file", code="invalid_file_id")
    words = len(server.store.file_path(record["id"]).read_bytes().split())
    return {"estimation_available": True, "estimated_total_price": 0.0,
            "allowed_to_proceed": True, "estimated_train_token_count": words * body.n_epochs,
            "estimated_eval_token_count": 0}


@router.post("/fine-tunes/{job_id}/cancel")
def cancel_job(server: ServerDep, job_id: str):
    return job_view(cancel(server, job_id, _finished))


@router.get("/fine-tunes/{job_id}/events")
def events(server: ServerDep, job_id: str):
    job_or_404(server, job_id)
    return {"data": [{"object": "fine-tune-event", "created_at": _iso(e["created_at"]),
                      "level": {"warn": "warning"}.get(e["level"], e["level"]),
                      "message": e["message"],
                      "type": EVENT_TYPES.get(e["level"], "job_start")}
                     for e in reversed(server.store.events(job_id))]}


# -- dedicated endpoints ------------------------------------------------------------------
HARDWARE = "local"
ENDPOINT_STATES = ("STARTED", "STOPPED")


class Autoscaling(_Body):
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: Annotated[int, Field(ge=1)] = 1


class EndpointCreate(_Body):
    model: str = Field(min_length=1, max_length=256)
    hardware: str = Field(min_length=1, max_length=128)
    autoscaling: Autoscaling
    display_name: str | None = Field(None, max_length=256)
    state: Literal[ENDPOINT_STATES] = "STARTED"
    inactive_timeout: Annotated[int, Field(ge=0)] | None = None


class EndpointUpdate(_Body):
    state: Literal[ENDPOINT_STATES] | None = None
    display_name: str | None = Field(None, max_length=256)
    inactive_timeout: Annotated[int, Field(ge=0)] | None = None


@router.get("/hardware")
def hardware(server: ServerDep, model: str | None = None):
    if model is not None:
        _served(server, model)
    return {"object": "list", "data": [{
        "object": "hardware", "id": HARDWARE, "pricing": {"cents_per_minute": 0.0},
        "specs": {"gpu_type": "none", "gpu_link": "none", "gpu_memory": 0, "gpu_count": 0},
        **({"availability": {"status": "available"}} if model is not None else {}),
        "updated_at": _iso(server.started)}]}


@router.post("/endpoints")
def create_endpoint(server: ServerDep, body: EndpointCreate):
    if body.hardware != HARDWARE:
        raise ApiError(400, f"Hardware {body.hardware} is not available; this server has "
                       f"'{HARDWARE}'.", param="hardware")
    record = {"id": f"endpoint-{uuid.uuid4()}", "model": body.model,
              "ref": _served(server, body.model),
              "name": f"{ORGANIZATION}/{body.model.split('/')[-1]}-{uuid.uuid4().hex[:8]}",
              "display_name": body.display_name or body.model, "hardware": body.hardware,
              "autoscaling": body.autoscaling.model_dump(),
              "inactive_timeout": body.inactive_timeout, "created": now(),
              "state": "PENDING" if body.state == "STARTED" else "STOPPED"}
    return endpoint_view(server.store.put_endpoint(record))


@router.get("/endpoints")
def list_endpoints(server: ServerDep, type: str | None = None):
    return {"object": "list", "data": [endpoint_view(e) for e in server.store.endpoints()
                                       if type in (None, "dedicated")]}


@router.get("/endpoints/{endpoint_id}")
def get_endpoint(server: ServerDep, endpoint_id: str):
    record = _endpoint(server, endpoint_id)
    if record["state"] == "PENDING":  # read back once pending: a local model is ready
        record = server.store.put_endpoint({**record, "state": "STARTED"})
    return endpoint_view(record)


@router.patch("/endpoints/{endpoint_id}")
def update_endpoint(server: ServerDep, endpoint_id: str, body: EndpointUpdate):
    changes = body.model_dump(exclude_none=True)
    return endpoint_view(server.store.put_endpoint({**_endpoint(server, endpoint_id),
                                                    **changes}))


@router.delete("/endpoints/{endpoint_id}", status_code=204)
def delete_endpoint(server: ServerDep, endpoint_id: str):
    server.store.put_endpoint({**_endpoint(server, endpoint_id), "deleted": True,
                               "state": "STOPPED"})
    return None


def _endpoint(server: Server, endpoint_id: str) -> dict:
    record = server.store.endpoint(endpoint_id)
    if record is None or record.get("deleted"):
        raise ApiError(404, f"Endpoint {endpoint_id} not found.", code="not_found")
    return record


def _served(server: Server, model: str) -> str:
    """The backend reference of a model this server can put on an endpoint."""
    if model == server.backend.default_model:
        return model
    entry = server.store.model(model)
    if entry is None:
        raise ApiError(404, f"Model {model} not found.", param="model", code="model_not_found")
    return entry["ref"]


def endpoint_view(record: dict) -> dict:
    return {"object": "endpoint", "type": "dedicated", "owner": ORGANIZATION,
            "created_at": _iso(record["created"]),
            **{k: record[k] for k in ("id", "name", "display_name", "model", "hardware",
                                      "state", "autoscaling", "inactive_timeout")}}


def _finished(job: dict) -> ApiError:
    """Why a finished job cannot be cancelled, in Together's words."""
    return ApiError(400, f"Job {job['id']} is already {STATUS[job['status']]}; it cannot be "
                    "cancelled.", param="id")


def job_view(record: dict) -> dict:
    """A store job as Together shows a fine-tune."""
    hyper, finetune = record["hyperparameters"], record.get("_finetune", {})
    rank = finetune.get("lora_rank", FinetuneConfig().lora_rank)
    return {
        "id": record["id"], "job_id": record["id"], "object": "finetune",
        "status": STATUS[record["status"]], "user_id": ORGANIZATION,
        "model": record["_root_model"], "model_output_name": record["_fine_tuned_model"],
        "suffix": record["user_provided_suffix"], "training_file": record["training_file"],
        "validation_file": record["validation_file"] or "",
        "from_checkpoint": record.get("_from_checkpoint"),
        "n_epochs": hyper["n_epochs"] if hyper["n_epochs"] != "auto" else None,
        "batch_size": hyper["batch_size"] if hyper["batch_size"] != "auto" else None,
        "learning_rate": finetune.get("learning_rate", BASE_LEARNING_RATE * (
            hyper["learning_rate_multiplier"] if hyper["learning_rate_multiplier"] != "auto"
            else 1.0)),
        "training_type": {"type": "Lora", "lora_r": rank,
                          "lora_alpha": finetune.get("lora_alpha", FinetuneConfig().lora_alpha),
                          "lora_dropout": finetune.get("lora_dropout", 0.0),
                          "lora_trainable_modules": "all-linear"},
        "training_method": {"method": "sft", "train_on_inputs": False},
        "random_seed": record["seed"], "token_count": record["trained_tokens"],
        "total_price": 0, "created_at": _iso(record["created_at"]),
        "updated_at": _iso(record["finished_at"] or record["created_at"]),
        "error": (record["error"] or {}).get("message"),
    }


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat()


# -- hooks into the shared layers ---------------------------------------------------------
def dialect(dedicated_lora: bool = False) -> Dialect:
    """Together's dialect. ``dedicated_lora``: serve the LoRA fine-tunes made here only on
    a dedicated endpoint (as api.together.ai does for some base models), refusing them by
    name."""
    return Dialect(router, upload_paths=("/v1/files/upload",),
                   resolve=partial(_resolve, dedicated_lora=dedicated_lora), chat=_chat)


def _resolve(server: Server, name: str, entry: dict | None, *,
             dedicated_lora: bool) -> str | None:
    """A started dedicated endpoint, by its name; with ``dedicated_lora``, a fine-tune
    made here in Together's dialect (not an ``ft:`` name) is refused by name."""
    if entry is None:
        served = [e for e in server.store.endpoints() if e["name"] == name]
        return served[0]["ref"] if served and served[0]["state"] == "STARTED" else None
    if dedicated_lora and not name.startswith("ft:"):
        raise ApiError(400, f"Unable to access non-serverless model {name}. Please "
                       f"visit https://api.together.ai/models/{name} to create and "
                       "start a new dedicated endpoint for the model.",
                       code="model_not_available")
    return None


def _chat(request, generations: list[Generation], answer: dict) -> dict:
    """Together's integer ``logprobs=k`` (not OpenAI's boolean) asks for its shape: the
    sampled tokens' logprobs as ``logprobs.tokens`` and ``logprobs.token_logprobs`` (no
    top-k), and a ``prompt`` list."""
    if isinstance(request.logprobs, bool) or not isinstance(request.logprobs, int):
        return answer
    choices = [{"index": i, "finish_reason": finish_reason(g),
                "message": {"role": "assistant", "content": g.text},
                "logprobs": {"tokens": list(g.tokens), "token_logprobs": list(g.logprobs)}}
               for i, g in enumerate(generations)]
    return {**answer, "choices": choices, "prompt": []}
