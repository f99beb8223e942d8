"""The Tinker SDK's wire format, for :mod:`semievol.server.tinker`: its JSON request bodies
(pydantic, unknown fields ignored) and the protobuf messages it sends for
``forward_backward`` and expects back for the results of ``forward_backward`` and
``asample`` (the schema is the SDK's own ``tinker.proto.tinker_public_pb2``, so the server
needs the ``tinker`` package: ``pip install "semievol[tinker]"``). What cannot be decoded
is a 400 that names the datum and field.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .http import ApiError

PROTO = "application/x-protobuf"
MAX_CONTEXT = 8192
"""The longest sequence (prompt + sampled tokens) this server takes: SmolLM2's context."""
MAX_RANK = 128


# -- JSON request bodies ----------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class LoraSpec(_Body):
    rank: int = Field(ge=1, le=MAX_RANK)
    seed: int | None = None
    train_unembed: bool = True
    train_mlp: bool = True
    train_attn: bool = True


class CreateModel(_Body):
    session_id: str
    model_seq_id: int
    base_model: str
    user_metadata: dict[str, Any] | None = None
    lora_config: LoraSpec | None = None
    optimizer_config: dict[str, Any] | None = None


class AdamParams(_Body):
    learning_rate: float = Field(1e-4, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-12, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip_norm: float = 0.0


class OptimStep(_Body):
    model_id: str
    seq_id: int | None = None
    adam_params: AdamParams | None = None
    optimizer_params: dict[str, Any] | None = None


class SaveWeights(_Body):
    model_id: str
    seq_id: int | None = None
    path: str | None = None
    overwrite: bool = False
    user_metadata: dict[str, str] | None = None


class LoadWeights(_Body):
    model_id: str | None = None
    seq_id: int | None = None
    session_id: str | None = None
    model_seq_id: int | None = None
    base_model: str | None = None
    user_metadata: dict[str, Any] | None = None
    path: str
    optimizer: bool


class CreateSamplingSession(_Body):
    session_id: str
    sampling_session_seq_id: int
    base_model: str | None = None
    model_path: str | None = None


class Chunk(_Body):
    type: str = "encoded_text"
    tokens: list[int] = []


class ModelInput(_Body):
    chunks: list[Chunk]


class SamplingParams(_Body):
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(1.0, ge=0)
    top_k: int = -1
    top_p: float = 1.0


class SampleBody(_Body):
    num_samples: int = Field(1, ge=1, le=128)
    prompt: ModelInput
    sampling_params: SamplingParams
    base_model: str | None = None
    model_path: str | None = None
    sampling_session_id: str | None = None
    seq_id: int | None = None
    prompt_logprobs: bool | None = None
    prompt_logprobs_last_n: int | None = Field(None, ge=1)
    topk_prompt_logprobs: int = 0
    topk_sample_logprobs: int = 0
    prompt_alt_tokens_k: int = 0
    target_prompt_logprobs: dict | None = None


# -- protobuf ------------------------------------------------------------------------------
def schema():
    """The SDK's protobuf schema (the wire format of forward_backward and of results)."""
    try:
        from tinker.proto import tinker_public_pb2
    except ImportError:
        raise ApiError(501, 'The Tinker API needs the tinker package on the server: pip '
                       'install "semievol[tinker]".') from None
    return tinker_public_pb2


def forward_backward_request(body: bytes):
    """The SDK's ForwardBackwardRequest message, or a 400."""
    message = schema().ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except Exception as e:  # the protobuf runtime's DecodeError
        raise ApiError(400, f"The forward_backward body is not a ForwardBackwardRequest "
                       f"protobuf: {e}") from None
    return message


def datum(index: int, datum) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(tokens, target tokens, weights) of datum ``index``, or a 400 naming what is wrong."""
    tokens: list[int] = []
    for chunk in datum.model_input:
        if chunk.WhichOneof("chunk") != "encoded_text":
            raise ApiError(400, f"data[{index}].model_input: only token chunks are supported "
                           "by this server.", param=f"data[{index}].model_input")
        tokens.extend(np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist())
    pb = schema()
    inputs = {name: _tensor(pb, tensor) for name, tensor in datum.loss_fn_inputs.items()}
    for name in ("target_tokens", "weights"):
        if name not in inputs:
            raise ApiError(400, f"data[{index}].loss_fn_inputs: '{name}' is missing.",
                           param=f"data[{index}].loss_fn_inputs.{name}")
        if inputs[name].shape != (len(tokens),):
            raise ApiError(400, f"data[{index}].loss_fn_inputs.{name}: {inputs[name].shape[0]} "
                           f"values for {len(tokens)} input tokens.",
                           param=f"data[{index}].loss_fn_inputs.{name}")
    if not tokens or len(tokens) > MAX_CONTEXT:
        raise ApiError(400, f"data[{index}].model_input: {len(tokens)} tokens; between 1 and "
                       f"{MAX_CONTEXT} are allowed.", param=f"data[{index}].model_input")
    return tokens, inputs["target_tokens"].astype(np.int64), inputs["weights"].astype(np.float32)


def _tensor(pb, tensor) -> np.ndarray:
    """A proto Tensor as a dense numpy array (a sparse CSR one densified with zeros)."""
    dtype = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64}.get(tensor.dtype)
    if dtype is None:
        raise ApiError(400, f"Tensor dtype {tensor.dtype} is not supported by this server.")
    shape = tuple(tensor.shape)
    if tensor.HasField("sparse_csr"):
        csr = tensor.sparse_csr
        values = np.frombuffer(csr.values, dtype=dtype)
        rows = np.frombuffer(csr.crow_indices, dtype=np.int64)
        cols = np.frombuffer(csr.col_indices, dtype=np.int64)
        dense = np.zeros(shape, dtype=dtype)
        for row in range(len(rows) - 1):
            dense[row, cols[rows[row]:rows[row + 1]]] = values[rows[row]:rows[row + 1]]
        return dense
    values = np.frombuffer(tensor.dense, dtype=dtype)
    return values.reshape(shape) if shape else values


def forward_backward_output(logprobs: list[np.ndarray], loss: float) -> bytes:
    """ForwardBackwardOutput: each datum's target logprobs, and ``loss:sum``."""
    pb = schema()
    out = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
    out.metrics["loss:sum"] = loss
    record = out.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(logprobs))
    column = record.fields["logprobs"]
    column.dtype = pb.DTYPE_FLOAT32
    column.data = b"".join(row.astype(np.float32).tobytes() for row in logprobs)
    column.offsets = np.cumsum([0] + [4 * len(row) for row in logprobs]).astype(
        np.int64).tobytes()
    return out.SerializeToString()


def sample_output(samples, prompt_logprobs: list[float] | None) -> bytes:
    """SampleResponse: each sample's tokens, logprobs and stop reason (and the prompt's
    logprobs when asked, NaN where there is none)."""
    pb = schema()
    out = pb.SampleResponse()
    if prompt_logprobs is not None:
        out.prompt_logprobs = np.asarray(prompt_logprobs, dtype=np.float32).tobytes()
    for sample in samples:
        out.sequences.add(
            stop_reason=pb.STOP_REASON_STOP if sample.stop_reason == "stop"
            else pb.STOP_REASON_LENGTH,
            tokens=np.asarray(sample.tokens, dtype=np.int32).tobytes(),
            logprobs=np.asarray(sample.logprobs, dtype=np.float32).tobytes())
    return out.SerializeToString()
