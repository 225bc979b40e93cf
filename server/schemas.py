"""Request bodies. Types and shapes are checked here (422 naming the field); ranges that depend on the
engine's limits (workers, max_tokens, prompt length) are checked by the engine, which names the field too."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from engine.protocol import MAX_LOGPROBS

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
    # Each sampled token's logprob and this many top alternatives, on its token event.
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

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


class OpenAIRequest(HogwildOptions):
    """What OpenAI's chat and completion bodies share; unknown OpenAI parameters are ignored (``user``),
    those this server cannot honour are refused naming them (``n`` but 1), Hogwild's ride along
    (``extra_body`` in the openai package). Unset sampling comes from the model, as on the jobs API."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def engine_params(self, default_max_tokens: int) -> dict[str, Any]:
        """The job's parameters, as ``Engine.submit`` takes them."""
        raise NotImplementedError

    def job_params(self, prompt: Any, max_tokens: int, logprobs: int | None) -> dict[str, Any]:
        return {"prompt": prompt, "max_tokens": max_tokens, **self.sampling_params(), "logprobs": logprobs}

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(OpenAIRequest):
    """OpenAI's chat completion body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32)
    logprobs: bool | None = None  # OpenAI's chat: a switch; top_logprobs: how many
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def engine_params(self, default_max_tokens: int) -> dict[str, Any]:
        given = [n for n in (self.max_completion_tokens, self.max_tokens) if n is not None]
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        prompt = [m.plain() for m in self.messages]
        return self.job_params(prompt, given[0] if given else default_max_tokens, logprobs)


class CompletionRequest(OpenAIRequest):
    """OpenAI's legacy completion body: one prompt, answered as the chat route answers one user message."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: Literal[False] = False  # the prompt is the workers' problem, not text they continue
    suffix: None = None
    best_of: Literal[1] | None = None

    def engine_params(self, default_max_tokens: int) -> dict[str, Any]:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return self.job_params(prompt, self.max_tokens or default_max_tokens, self.logprobs)


class ErrorDetail(BaseModel):
    message: str
    type: str
    field: str | None = None  # the offending input, where there is one
    code: int  # the HTTP status again


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer of the jobs API and the operations, naming the field."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, rate_limit_error or server_error
    param: str | None = None  # the offending input, where there is one
    code: str  # invalid_value, invalid_api_key, model_not_found, context_length_exceeded, ...


class OpenAIErrorBody(BaseModel):
    """Every 4xx and 5xx answer of the OpenAI routes: OpenAI's own shape."""

    error: OpenAIErrorDetail


ERROR_MEANINGS = {
    401: "missing or wrong API key",
    404: "no such job or model",
    408: "the request body stopped arriving",
    413: "the body, or the prompt with the workers' budget, is too large",
    400: "invalid input; the error's param names it",
    422: "invalid input; the error names the field",
    429: "the queue is full; retry after Retry-After seconds",
    500: "the job failed in the engine",
    503: "the engine is starting, stalled or down",
}


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """What a route may answer besides success, for /openapi.json (``openai``: in OpenAI's shape)."""
    model = OpenAIErrorBody if openai else ErrorBody
    return {status: {"description": ERROR_MEANINGS[status], "model": model} for status in statuses}
