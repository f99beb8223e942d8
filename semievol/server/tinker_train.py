"""The Tinker dialect's training side (:mod:`semievol.server.tinker`): training runs made by
primitives (create_model, forward_backward, optim_step), their checkpoints (save and load,
with or without the optimizer state) and the listings of both."""
from __future__ import annotations

import re
import secrets
import shutil

from fastapi import APIRouter, Request

from . import tinker_wire as wire
from .http import ApiError
from .tinker_state import Failed, Tinker, clock, iso, tinker_of
from .tinker_wire import AdamParams, CreateModel, LoadWeights, LoraSpec, OptimStep, SaveWeights

router = APIRouter()
"""Included in the dialect's router (:data:`semievol.server.tinker.router`)."""

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A checkpoint name a client may choose (it becomes a directory name)."""
KINDS = {"weights": "training", "sampler_weights": "sampler"}
TOKENIZERS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The hub id of a served alias's tokenizer (``get_info``'s ``tokenizer_id``, which the
SDK's ``get_tokenizer`` loads); any other served name is its own tokenizer's id."""


# -- training ----------------------------------------------------------------------------
@router.post("/create_model")
def create_model(request: Request, body: CreateModel):
    tinker = tinker_of(request)
    tinker.check_base(body.base_model)
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
        tinker.record_run(model_id, lora.rank, body.user_metadata)
        return {"type": "create_model", "model_id": model_id}

    return {**tinker.submit("create_model", work), "model_id": model_id}


@router.post("/get_info")
def get_info(request: Request, body: dict):
    tinker = tinker_of(request)
    run = tinker.training_run(str(body.get("model_id")))
    return {"type": "get_info", "model_id": run["id"], "model_name": run["base_model"],
            "model_data": {"arch": "llama", "model_name": run["base_model"],
                           "tokenizer_id": TOKENIZERS.get(run["base_model"],
                                                          run["base_model"])},
            "is_lora": True, "lora_rank": run["rank"],
            "optimizer_config": {"type": "adamw"}}


@router.post("/forward_backward")
async def forward_backward(request: Request):
    """Decode the SDK's protobuf request; queue the pass (forward only when asked)."""
    tinker = tinker_of(request)
    if request.headers.get("content-encoding", "identity") != "identity":
        raise ApiError(400, "Compressed forward_backward bodies are not supported; this "
                       "server's /client/config turns compression off.")
    message = wire.forward_backward_request(await request.body())
    tinker.training_run(message.model_id)
    if message.loss_fn != "cross_entropy":
        raise ApiError(400, f"Loss '{message.loss_fn}' is not supported by this server; use "
                       "'cross_entropy'.", param="loss_fn")
    data = [wire.datum(i, d) for i, d in enumerate(message.data)]
    if not data:
        raise ApiError(400, "forward_backward needs at least one datum.", param="data")
    backward = not message.forward_only
    model_id, primitives = message.model_id, tinker.primitives

    def work():
        tinker.live(model_id)
        logprobs, loss = primitives.forward_backward(model_id, data, backward=backward)
        return wire.forward_backward_output(logprobs, loss)

    return tinker.submit("forward_backward", work, target=model_id, seq_id=message.seq_id)


@router.post("/optim_step")
def optim_step(request: Request, body: OptimStep):
    tinker = tinker_of(request)
    tinker.training_run(body.model_id)
    if body.optimizer_params is not None and body.adam_params is None:
        raise ApiError(400, "Only Adam steps (adam_params) are supported by this server.",
                       param="optimizer_params")
    adam = body.adam_params or AdamParams()
    primitives = tinker.primitives

    def work():
        tinker.live(body.model_id)
        metrics = primitives.optim_step(body.model_id, **adam.model_dump())
        run = tinker.server.store.training_run(body.model_id)
        tinker.record_run(body.model_id, run["rank"], None)
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
        "checkpoint_type": KINDS[kind], "time": clock(), "size_bytes": size,
        "directory": str(final), "optimizer": kind == "weights",
        **({"user_metadata": metadata} if metadata else {})})
    return {"path": path, "directory": str(final)}


@router.post("/save_weights")
def save_weights(request: Request, body: SaveWeights):
    tinker = tinker_of(request)
    tinker.training_run(body.model_id)
    name = _name(body.path)

    def work():
        tinker.live(body.model_id)
        saved = _save(tinker, body.model_id, name or "state-" + secrets.token_hex(6),
                      "weights", body.user_metadata, body.overwrite)
        return {"type": "save_weights", "path": saved["path"]}

    return tinker.submit("save_weights", work, target=body.model_id, seq_id=body.seq_id)


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(request: Request, body: SaveWeights):
    """Named: a sampler checkpoint. Unnamed (``save_weights_and_get_sampling_client``):
    an ephemeral one and a sampling session on it."""
    tinker = tinker_of(request)
    tinker.training_run(body.model_id)
    name = _name(body.path)
    named = name is not None

    def work():
        tinker.live(body.model_id)
        saved = _save(tinker, body.model_id, name, "sampler_weights", body.user_metadata,
                      body.overwrite)
        if named:
            return {"type": "save_weights_for_sampler", "path": saved["path"]}
        session = tinker.new_sampler(saved["path"], saved["directory"])
        return {"type": "save_weights_for_sampler", "path": saved["path"],
                "sampling_session_id": session}

    return tinker.submit("save_weights_for_sampler", work, target=body.model_id,
                         seq_id=body.seq_id)


@router.post("/load_weights")
def load_weights(request: Request, body: LoadWeights):
    """Into an existing run (``model_id``), or a new run made from the checkpoint
    (``session_id`` + ``model_seq_id``, ``create_training_client_from_state``)."""
    tinker = tinker_of(request)
    checkpoint = tinker.checkpoint(body.path)
    if body.optimizer and not checkpoint["optimizer"]:
        raise ApiError(400, f"Checkpoint {body.path} holds no optimizer state (saved for "
                       "sampling); load it without the optimizer.", param="optimizer")
    if body.model_id is not None:
        model_id = body.model_id
        tinker.training_run(model_id)
    elif body.session_id is not None and body.model_seq_id is not None:
        tinker.check_base(body.base_model)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
    else:
        raise ApiError(400, "Name the model to load into (model_id), or a session_id and "
                       "model_seq_id for a new one.", param="model_id")
    source = tinker.server.store.training_run(checkpoint["run_id"])
    primitives = tinker.primitives

    def work():
        primitives.drop(model_id)
        primitives.load(model_id, checkpoint["directory"], optimizer=body.optimizer)
        tinker.record_run(model_id, source["rank"] if source else 0, body.user_metadata)
        return {"type": "load_weights", "path": body.path, "model_id": model_id}

    return tinker.submit("load_weights", work, target=model_id, seq_id=body.seq_id)


@router.post("/weights_info")
def weights_info(request: Request, body: dict):
    tinker = tinker_of(request)
    checkpoint = tinker.checkpoint(str(body.get("tinker_path")), "tinker_path")
    run = tinker.server.store.training_run(checkpoint["run_id"]) or {}
    return {"base_model": tinker.base_model, "is_lora": True, "lora_rank": run.get("rank"),
            "optimizer_config": {"type": "adamw"}}


def _checkpoint_view(record: dict) -> dict:
    return {"checkpoint_id": record["checkpoint_id"],
            "checkpoint_type": record["checkpoint_type"], "time": iso(record["time"]),
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
            "lora_rank": run["rank"], "last_request_time": iso(run["last_request"]),
            "last_checkpoint": last("training"), "last_sampler_checkpoint": last("sampler"),
            "user_metadata": run["user_metadata"]}


@router.get("/training_runs")
def training_runs(request: Request, limit: int = 20, offset: int = 0):
    tinker = tinker_of(request)
    runs = tinker.server.store.training_runs()
    return {"training_runs": [_run_view(tinker, r) for r in runs[offset:offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)}}


@router.get("/training_runs/{run_id}")
def training_run(request: Request, run_id: str):
    tinker = tinker_of(request)
    return _run_view(tinker, tinker.training_run(run_id))


@router.get("/training_runs/{run_id}/checkpoints")
def run_checkpoints(request: Request, run_id: str):
    tinker = tinker_of(request)
    tinker.training_run(run_id)
    return {"checkpoints": [_checkpoint_view(c)
                            for c in tinker.server.store.checkpoints(run_id)]}


@router.get("/checkpoints")
def all_checkpoints(request: Request, limit: int = 100, offset: int = 0):
    found = tinker_of(request).server.store.checkpoints()
    return {"checkpoints": [_checkpoint_view(c) for c in found[offset:offset + limit]],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(found)}}

