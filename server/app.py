"""The HTTP front end: jobs with interleaved event streams, the OpenAI-compatible routes, operations.

The app never touches the model: it owns a ``Hub`` that talks to the engine process. Errors are JSON
``{"error": {"message", "type", "field", "code"}}`` with a 4xx status, and OpenAI's own shape on the
OpenAI routes (server/errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.connection import EngineUnavailable
from engine.protocol import BAD_SETUP
from server import errors
from server.errors import ApiError
from server.hub import Hub
from server.metrics import Metrics
from server.openai_api import openai_routes
from server.records import JobRecord
from server.schemas import JobRequest, error_responses
from server.settings import Settings
from server.sse import event_source

log = logging.getLogger("hogwild.server")
STATIC = Path(__file__).parent / "static"
CANCEL_WAIT_S = 5.0  # DELETE waits this long per engine message for the job's done event


class BodyLimit:
    """Read every request body here: refuse one over ``limit`` bytes with 413, whether or not Content-Length
    is sent, and one that stops arriving for ``timeout`` seconds (shorter than its Content-Length, say)
    with 408; the app gets the whole body at once."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        openai = errors.speaks_openai(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            too_large = ApiError(413, f"request body over {self.limit} bytes", "too_large")
            await too_large.response(openai)(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                late = ApiError(408, f"the request body stopped arriving for {self.timeout:.0f} s", "timeout")
                await late.response(openai)(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client went away
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                too_large = ApiError(413, f"request body over {self.limit} bytes", "too_large")
                await too_large.response(openai)(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect a stream listens for
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    hub = Hub(settings, metrics)
    started = time.monotonic()

    async def start_engine() -> None:
        try:
            await hub.start()
            if not hub.ready:  # standalone engines not up yet: the hub keeps trying, /ready says so
                return
            info = hub.info
            ranks = info.get("tensor_parallel", 1)
            log.info(
                "ready: http://%s:%s (%s on %s, %s, %d KV pages of %d tokens, up to %d workers%s) in %.1f s",
                settings.host,
                settings.port,
                info.get("model"),
                f"{ranks} ranks from {info.get('device')}" if ranks > 1 else info.get("device"),
                info.get("dtype"),
                info.get("total_pages", 0),
                info.get("page_size", 0),
                info.get("max_workers", 0),
                f"; {len(hub.links)} engines" if len(hub.links) > 1 else "",
                time.monotonic() - started,
            )
        except Exception as exc:
            log.error("the engine failed to start: %s", exc)
            stop = app.state.stop_server
            if stop is not None:  # a bad set-up (any engine's first start failed): stop, not serve 503
                app.state.exit_code = BAD_SETUP if getattr(exc, "status", None) == BAD_SETUP else 1
                stop()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The model may take minutes to load on first start: serve /health meanwhile, /ready says 503.
        starting = asyncio.create_task(start_engine())
        yield
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await hub.stop()

    app = FastAPI(title="Hogwild! inference server", version="0.1.0", lifespan=lifespan)
    app.state.hub = hub
    app.state.settings = settings
    app.state.exit_code = 0
    app.state.stop_server = None  # set by python -m server: how to stop when the engine cannot start
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, timeout=settings.body_timeout_s)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            # Credentials with any origin would let every site act with a user's cookie.
            allow_credentials="*" not in settings.cors_origins,
        )

    errors.install(app)

    # -- operations ---------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """The server is up (200 however its engines are), and each engine's state."""
        return {
            "status": "ok",
            "engines": [{"engine": e["engine"], "state": e["state"]} for e in hub.engines()],
        }

    @app.get("/ready")
    async def ready() -> Response:
        """200 while at least one engine takes jobs; each engine listed with its state and load."""
        await hub.probe()
        engines = hub.engines()
        if hub.ready:
            return JSONResponse({"status": "ready", "model": hub.model_name, "engines": engines})
        body = {"status": "unavailable", "reason": hub.unavailable, "engines": engines}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if hub.ready:
            with contextlib.suppress(EngineUnavailable, asyncio.TimeoutError):
                await hub.stats()
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        index = STATIC / "index.html"
        if not index.exists():
            raise ApiError(404, "the dashboard is not installed", "not_found")
        return FileResponse(index)

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- /v1 ----------------------------------------------------------------------------------------

    def authorize(request: Request) -> None:
        """Bearer header or the dashboard's cookie; compared in constant time."""
        if settings.api_key is None:
            return
        expected = settings.api_key.get_secret_value().encode()
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else request.cookies.get("hogwild_key", "")
        if not hmac.compare_digest(given.encode(), expected):
            raise ApiError(401, "missing or wrong API key", "unauthorized", WWW_Authenticate="Bearer")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)], responses=error_responses(401, 422, 503))

    def record_of(job_id: str) -> JobRecord:
        record = hub.store.get(job_id)
        if record is None:
            raise ApiError(404, f"no job {job_id!r}", "not_found", "id")
        return record

    def stream(record: JobRecord, after: int, cancel_on_disconnect: bool) -> EventSourceResponse:
        async def events() -> AsyncIterator[ServerSentEvent]:
            try:
                async for ev in record.follow(after):
                    yield ServerSentEvent(data=json.dumps(ev.data), event=ev.type, id=str(ev.seq))
            finally:
                if cancel_on_disconnect and not record.ended:  # the client went away mid-job
                    hub.background(hub.cancel(record))

        headers = {"X-Job-Id": record.id, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return event_source(events(), settings.keepalive_s, headers)

    @v1.get("/stats")
    async def engine_stats() -> dict[str, Any]:
        """The engines' counters: jobs, pages, steps and the prefix cache (what /metrics exports), summed
        over the engines that answer, and each engine's own under ``engines``."""
        try:
            return await hub.stats()
        except asyncio.TimeoutError:
            raise ApiError(503, "the engine did not answer within 5 s", "engine_unavailable") from None

    @v1.post("/jobs", status_code=201, response_model=None, responses=error_responses(408, 413, 429))
    async def create_job(body: JobRequest, request: Request) -> Response | dict[str, Any]:
        record = await hub.submit(body.engine_params(), body.options())
        wants_stream = body.stream or "text/event-stream" in request.headers.get("accept", "")
        if wants_stream:
            return stream(record, -1, cancel_on_disconnect=not body.detach)
        return JSONResponse(
            record.to_dict(hub.model_name), status_code=201, headers={"Location": f"/v1/jobs/{record.id}"}
        )

    @v1.get("/jobs")
    async def list_jobs(limit: int = Query(50, ge=0, le=10_000)) -> dict[str, Any]:
        return {"object": "list", "data": [r.to_dict(hub.model_name) for r in hub.store.recent(limit)]}

    @v1.get("/jobs/{job_id}", responses=error_responses(404))
    async def get_job(job_id: str) -> dict[str, Any]:
        return record_of(job_id).to_dict(hub.model_name)

    @v1.delete("/jobs/{job_id}", responses=error_responses(404))
    async def cancel_job(job_id: str) -> dict[str, Any]:
        record = record_of(job_id)
        await hub.cancel(record)
        # The engine frees the job at once and its done event follows on the next message.
        while not record.ended and await record.changed_within(CANCEL_WAIT_S):
            pass
        return record.to_dict(hub.model_name)

    @v1.get("/jobs/{job_id}/events", responses=error_responses(404))
    async def job_events(job_id: str, request: Request) -> EventSourceResponse:
        record = record_of(job_id)
        last = request.headers.get("last-event-id", "-1")
        try:
            after = int(last)
        except ValueError:
            raise ApiError(
                422, "Last-Event-ID must be an integer", "invalid_request_error", "Last-Event-ID"
            ) from None
        return stream(record, after, cancel_on_disconnect=False)

    app.include_router(v1)
    # Not under v1's responses: these answer errors in OpenAI's shape (server/errors.py).
    app.include_router(openai_routes(hub), prefix="/v1", dependencies=[Depends(authorize)])

    def openapi() -> dict[str, Any]:
        """FastAPI lists a 422 for every route with a body: the OpenAI routes answer 400 instead."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)
        for path, operations in schema["paths"].items():
            for operation in operations.values() if errors.speaks_openai(path) else ():
                operation["responses"].pop("422", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
