"""The Tinker API's dialect, served beside OpenAI's and Together's on the same port, so the
official ``tinker`` SDK (``ServiceClient(base_url="http://HOST:PORT")``) trains and samples
a local model with LoRA by primitives. Needs the hf backend and the ``tinker`` package
(``pip install "semievol[serve,tinker]"``), whose protobuf schema the SDK speaks for
``forward_backward`` and for the results of ``forward_backward`` and ``asample`` (the wire
format: :mod:`.tinker_wire`; the torch side: :mod:`semievol.backends.hf.primitives`). This
module holds the session, sampling and future routes; :mod:`.tinker_train` the training
runs and checkpoints; :mod:`.tinker_state` the state both share.

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
import secrets

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from . import tinker_train
from . import tinker_wire as wire
from .http import ApiError, Dialect, authorize, error_response, log
from .tinker_state import Failed, Tinker, clock, tinker_of
from .tinker_wire import MAX_CONTEXT, CreateSamplingSession, SampleBody

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
    name = tinker_of(request).base_model
    return {"supported_models": [{"model_name": name, "max_context_length": MAX_CONTEXT,
                                  "trainable": True, "sampleable": True}]}


@router.post("/create_session")
def create_session(request: Request):
    tinker = tinker_of(request)
    session_id = "session-" + secrets.token_hex(8)
    tinker.sessions[session_id] = clock()
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
def session_heartbeat(request: Request):
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(request: Request, session_id: str):
    """The session's training runs leave memory (after their queued requests); their
    checkpoints stay."""
    tinker = tinker_of(request)
    tinker.sessions.pop(session_id, None)
    if tinker._primitives is not None:
        primitives = tinker.primitives

        def work():
            for name in [n for n in primitives.runs if n.startswith(f"{session_id}:train:")]:
                primitives.drop(name)

        tinker.submit("finish", work)
    return {}


# -- sampling ----------------------------------------------------------------------------
def _sampler_ref(tinker: Tinker, model_path: str | None, base_model: str | None) -> str:
    """The backend reference of a sampling target: a sampler or training checkpoint's
    adapter directory, or the base model."""
    if model_path is not None:
        if model_path in tinker.ephemeral:
            return tinker.ephemeral[model_path]
        return tinker.checkpoint(model_path, "model_path")["directory"]
    if base_model is None:
        raise ApiError(400, "Name a model_path or a base_model to sample from.",
                       param="base_model")
    tinker.check_base(base_model)
    return tinker.base_model


@router.post("/create_sampling_session")
def create_sampling_session(request: Request, body: CreateSamplingSession):
    tinker = tinker_of(request)
    ref = _sampler_ref(tinker, body.model_path, body.base_model)
    return {"type": "create_sampling_session",
            "sampling_session_id": tinker.new_sampler(body.model_path, ref)}


@router.get("/samplers/{sampler_id}")
def get_sampler(request: Request, sampler_id: str):
    sampler = tinker_of(request).samplers.get(sampler_id)
    if sampler is None:
        raise ApiError(404, f"No sampling session '{sampler_id}'.", param="sampler_id")
    return {"sampler_id": sampler_id, "base_model": sampler["base_model"],
            "model_path": sampler["model_path"]}


@router.post("/asample")
def asample(request: Request, body: SampleBody):
    tinker = tinker_of(request)
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
    tinker = tinker_of(request)
    request_id = str(body.get("request_id"))
    future = tinker.futures.get(request_id)
    if future is None:
        return error_response(410, f"Unknown or expired future {request_id}.",
                              param="request_id", code="future_expired")
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


router.include_router(tinker_train.router)


def dialect() -> Dialect:
    return Dialect(router)
