"""Request bodies, validated by pydantic with the limits of the OpenAI API spec.

Unknown fields are ignored (the SDK and other clients send fields this server does not act
on; the real API accepts them too); a field we cannot honour when set, such as
``stream=true`` or tool messages, is refused by the route with a 400.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Auto = Literal["auto"]
MAX_COMPLETION_TOKENS = 4096
"""The longest completion a request may ask for (the backend allocates for it up front)."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Hyperparameters(_Body):
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=1000)] = "auto"
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"


class Supervised(_Body):
    hyperparameters: Hyperparameters = Hyperparameters()


class Method(_Body):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None


class JobCreate(_Body):
    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = Field(None, max_length=128)
    hyperparameters: Hyperparameters | None = None
    """Deprecated by OpenAI in favour of ``method``, still accepted."""
    method: Method | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[^:\s]+$")
    seed: int | None = Field(None, ge=0, le=2147483647)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    integrations: list | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value):
        if value is not None and (len(value) > 16 or any(len(k) > 64 for k in value)):
            raise ValueError("at most 16 keys of at most 64 characters")
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    n: int | None = Field(1, ge=1, le=128)
    temperature: float | None = Field(1.0, ge=0, le=2)
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_COMPLETION_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_COMPLETION_TOKENS)
    logprobs: bool | int | None = False
    """OpenAI's boolean, or an integer (top-k, 0-20) as Together's dialect sends it, whose
    ``chat`` hook then answers in its shape (:mod:`semievol.server.together`)."""
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool | None = False


    @field_validator("logprobs", mode="plain")
    @classmethod
    def _logprobs(cls, value):
        if value is None or isinstance(value, bool) or (
                isinstance(value, int) and 0 <= value <= 20):
            return value
        raise ValueError("must be a boolean (OpenAI) or an integer from 0 to 20 (Together)")


class EmbeddingRequest(_Body):
    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[str], Field(min_length=1, max_length=2048)] | \
        Annotated[list[int], Field(min_length=1)] | Annotated[list[list[int]], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
