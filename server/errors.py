"""Errors as JSON ``{"error": {"message", "type", "field", "code"}}`` with a 4xx status: the shape OpenAI
clients parse, and one that names the offending field for everyone else."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.connection import EngineRefused, EngineUnavailable
from engine.protocol import INVALID, NOT_FOUND, QUEUE_FULL, SHUTTING_DOWN, TOO_LONG

STATUS_BY_CODE = {INVALID: 422, TOO_LONG: 413, QUEUE_FULL: 429, NOT_FOUND: 404, SHUTTING_DOWN: 503}
RETRY_AFTER_S = "2"
UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, field: str | None = None, **headers: str):
        super().__init__(message)
        self.status, self.message, self.kind, self.field, self.headers = status, message, kind, field, headers

    def response(self) -> Response:
        body = {
            "error": {"message": self.message, "type": self.kind, "field": self.field, "code": self.status}
        }
        return JSONResponse(body, status_code=self.status, headers=self.headers or None)

    @classmethod
    def from_engine(cls, exc: EngineRefused) -> ApiError:
        status = STATUS_BY_CODE.get(exc.code, 422)
        headers = {"Retry-After": RETRY_AFTER_S} if status == 429 else {}
        return cls(status, exc.message, exc.code, exc.field, **headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(EngineRefused)
    async def engine_refused(_: Request, exc: EngineRefused) -> Response:
        return ApiError.from_engine(exc).response()

    @app.exception_handler(EngineUnavailable)
    async def engine_down(_: Request, exc: EngineUnavailable) -> Response:
        return ApiError(503, f"the engine is not available: {exc}", "engine_unavailable").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return ApiError(
                422, f"the body is not valid JSON: {first['msg']}", "invalid_request_error", "body"
            ).response()
        # Union members show up in the location as type names ("stop.str") after the field users wrote; a
        # field of that name ({"int": 1}) is still named.
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        loc = loc[:1] + [p for p in loc[1:] if p not in UNION_MEMBERS]
        field = ".".join(p for p in loc if "[" not in p) or None
        if field is None:  # about the body as a whole: not an object, or the prompt/messages rule
            field = "prompt" if "prompt and messages" in str(first["msg"]) else "body"
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
        return ApiError(422, message, "invalid_request_error", field).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return ApiError(exc.status_code, str(exc.detail), "http_error").response()
