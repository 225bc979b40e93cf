"""Request bodies. Types and shapes are checked here (422 naming the field); ranges that depend on the
engine's limits (workers, max_tokens, prompt length) are checked by the engine, which names the field too."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INT32 = 2**31 - 1  # bounds for counts: the engine checks its own, smaller limits and names them
# A bound on the list member only: on the union it was applied to a bool too, and raised (a 500).
Strings = Annotated[list[str], Field(max_length=256)]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class HogwildOptions(BaseModel):
    """How the workers collaborate and sample: shared by the jobs API and the OpenAI route. The fields are
    engine.protocol.JobOptions' (a test holds them equal); this adds only HTTP's types and bounds."""

    model_config = ConfigDict(allow_inf_nan=False)

    workers: int = Field(2, ge=1, le=INT32)
    layout: str = "combined"
    # Unset sampling comes from the model's generation config (greedy when it has none).
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = Field(None, ge=0, le=INT32)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: str | Strings | None = None
    # OpenAI's: token ids (as strings) to a bias in [-100, 100]; the engine checks ids and values.
    logit_bias: dict[str, float] | None = Field(None, max_length=256)
    quick_check_every: int = Field(1024, ge=0, le=INT32)
    finisher: bool = True
    finisher_tokens: int = Field(16, ge=1, le=INT32)
    checkpoints: list[Annotated[int, Field(ge=1, le=INT32)]] | None = Field(None, max_length=64)
    instructions: str | None = Field(None, max_length=100)
    suppress: bool | Strings | None = None
    answer_pattern: str | None = Field(None, max_length=500)

    def sampling_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in HogwildOptions.model_fields}


class JobRequest(HogwildOptions):
    # Strict: "2" or true is no number of workers, "yes" no boolean (the OpenAI route stays lax).
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]},
    )

    prompt: str | None = None
    messages: list[Message] | None = None
    max_tokens: int = Field(512, ge=1, le=INT32)
    stream: bool = False
    detach: bool = False

    @model_validator(mode="after")
    def one_prompt(self) -> JobRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self

    def engine_params(self) -> dict[str, Any]:
        prompt: Any = self.prompt if self.messages is None else [m.model_dump() for m in self.messages]
        return {"prompt": prompt, "max_tokens": self.max_tokens, **self.sampling_params()}

    def options(self) -> dict[str, Any]:
        """What the job object shows of its request."""
        return {"max_tokens": self.max_tokens, **self.sampling_params()}


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(HogwildOptions):
    """OpenAI's chat completion body; unknown OpenAI parameters are ignored, Hogwild's ride along
    (``extra_body`` in the openai package). Unset sampling comes from the model, as on the jobs API."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def engine_params(self, default_max_tokens: int) -> dict[str, Any]:
        given = [n for n in (self.max_completion_tokens, self.max_tokens) if n is not None]
        max_tokens = given[0] if given else default_max_tokens
        return {
            "prompt": [m.plain() for m in self.messages],
            "max_tokens": max_tokens,
            **self.sampling_params(),
        }


class ErrorDetail(BaseModel):
    message: str
    type: str
    field: str | None = None  # the offending input, where there is one
    code: int  # the HTTP status again


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer: the shape OpenAI clients parse, naming the field for everyone else."""

    error: ErrorDetail


ERROR_MEANINGS = {
    401: "missing or wrong API key",
    404: "no such job or model",
    408: "the request body stopped arriving",
    413: "the body, or the prompt with the workers' budget, is too large",
    422: "invalid input; the error names the field",
    429: "the queue is full; retry after Retry-After seconds",
    503: "the engine is starting, stalled or down",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """What a route may answer besides success, for /openapi.json."""
    return {status: {"description": ERROR_MEANINGS[status], "model": ErrorBody} for status in statuses}
