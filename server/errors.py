"""Errors as JSON with a 4xx or 5xx status, in one of two shapes chosen by the route:

- the jobs API and operations: ``{"error": {"message", "type", "field", "code"}}``, ``code`` the status
  again and ``field`` the offending input; invalid input is 422;
- the OpenAI routes (``OPENAI_PATHS``): OpenAI's own ``{"error": {"message", "type", "param", "code"}}``,
  ``param`` the offending input and ``code`` a string; invalid input is 400 ``invalid_request_error``, as
  OpenAI and vLLM answer, so the ``openai`` package raises ``BadRequestError`` with ``e.param`` set."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.connection import EngineRefused, EngineUnavailable
from engine.protocol import INVALID, NOT_FOUND, QUEUE_FULL, SHUTTING_DOWN, TOO_LONG

STATUS_BY_CODE = {INVALID: 422, TOO_LONG: 413, QUEUE_FULL: 429, NOT_FOUND: 404, SHUTTING_DOWN: 503}
RETRY_AFTER_S = "2"
UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict"}


OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
# OpenAI's error code for each of this server's error kinds (the engine's reply codes among them).
OPENAI_CODES = {
    "invalid_request_error": "invalid_value",
    INVALID: "invalid_value",
    TOO_LONG: "context_length_exceeded",
    "too_large": "request_too_large",
    QUEUE_FULL: "rate_limit_exceeded",
    NOT_FOUND: "not_found",
    SHUTTING_DOWN: "engine_unavailable",
    "unauthorized": "invalid_api_key",
    "timeout": "request_timeout",
}


def speaks_openai(path: str) -> bool:
    """Whether a request's path is one of the OpenAI routes, which answer errors in OpenAI's shape."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return "rate_limit_error" if status == 429 else "invalid_request_error"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, field: str | None = None, **headers: str):
        super().__init__(message)
        self.status, self.message, self.kind, self.field, self.headers = status, message, kind, field, headers

    def response(self, openai: bool = False) -> Response:
        """The answer in the jobs API's shape, or with ``openai`` in OpenAI's (422 becomes 400)."""
        status = 400 if openai and self.status == 422 else self.status
        error = (
            self.openai_error(status)
            if openai
            else {"message": self.message, "type": self.kind, "field": self.field, "code": status}
        )
        return JSONResponse({"error": error}, status_code=status, headers=self.headers or None)

    def openai_error(self, status: int) -> dict[str, Any]:
        code = OPENAI_CODES.get(self.kind, self.kind)
        if self.kind == "http_error":
            code = "not_found" if status == 404 else f"http_{status}"
        return {"message": self.message, "type": openai_type(status), "param": self.field, "code": code}

    @classmethod
    def from_engine(cls, exc: EngineRefused) -> ApiError:
        status = STATUS_BY_CODE.get(exc.code, 422)
        headers = {"Retry-After": RETRY_AFTER_S} if status == 429 else {}
        return cls(status, exc.message, exc.code, exc.field, **headers)


def install(app: FastAPI) -> None:
    def answer(request: Request, exc: ApiError) -> Response:
        return exc.response(openai=speaks_openai(request.url.path))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return answer(request, exc)

    @app.exception_handler(EngineRefused)
    async def engine_refused(request: Request, exc: EngineRefused) -> Response:
        return answer(request, ApiError.from_engine(exc))

    @app.exception_handler(EngineUnavailable)
    async def engine_down(request: Request, exc: EngineUnavailable) -> Response:
        return answer(request, ApiError(503, f"the engine is not available: {exc}", "engine_unavailable"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first['msg']}"
            return answer(request, ApiError(422, message, "invalid_request_error", "body"))
        # Union members show up in the location as type names ("stop.str") after the field users wrote; a
        # field of that name ({"int": 1}) is still named.
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        loc = loc[:1] + [p for p in loc[1:] if p not in UNION_MEMBERS]
        field = ".".join(p for p in loc if "[" not in p) or None
        if field is None:  # about the body as a whole: not an object, or the prompt/messages rule
            field = "prompt" if "prompt and messages" in str(first["msg"]) else "body"
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
        return answer(request, ApiError(422, message, "invalid_request_error", field))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return answer(request, ApiError(exc.status_code, str(exc.detail), "http_error"))
