"""OpenAI-compatible routes, so the official ``openai`` package works unchanged.

Mapping: the job's final answer is the message ``content``; the workers' texts are ``reasoning_content``,
each worker's part headed by its name (streamed as deltas that also carry ``worker`` and
``worker_name``). Hogwild options (workers, layout, top_k, quick_check_every, finisher) ride in the
body, which is what ``extra_body`` does. ``max_tokens`` is per worker. Finish reasons ``answer`` and
``stop`` map to ``stop``; ``length`` stays ``length``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.errors import ApiError
from server.hub import Hub
from server.records import JobRecord
from server.schemas import ChatRequest, error_responses
from server.sse import event_source

DEFAULT_MAX_TOKENS = 512
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request looks for its client


def finish_reason(record: JobRecord) -> str:
    return "length" if record.finish_reason == "length" else "stop"


def reasoning(record: JobRecord) -> str:
    return "\n\n".join(f"[{w.name}]\n{w.text.strip()}" for w in record.workers)


def openai_usage(record: JobRecord) -> dict[str, Any]:
    usage = record.usage or record.usage_so_far()
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
    }


def openai_routes(hub: Hub) -> APIRouter:
    router = APIRouter()

    @router.get("/models")
    async def models() -> dict[str, Any]:
        hub.engine()
        entry = {"id": hub.model_name, "object": "model", "created": 0, "owned_by": "hogwild"}
        return {"object": "list", "data": [entry]}

    @router.post("/chat/completions", response_model=None, responses=error_responses(404, 408, 413, 429))
    async def chat(body: ChatRequest, request: Request) -> Response | dict[str, Any]:
        if body.model not in (None, "", hub.model_name):
            raise ApiError(404, f"model {body.model!r} is not served here", "model_not_found", "model")
        record = await hub.submit(body.engine_params(DEFAULT_MAX_TOKENS), body.sampling_params())
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_source(chunks(hub, record, completion_id, include_usage), hub.settings.keepalive_s)
        await wait_or_cancel(hub, record, request)
        if record.status == "failed":
            raise ApiError(500, f"the job failed: {record.error}", "engine_error")
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(record.created),
            "model": hub.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": record.answer or "",
                        "reasoning_content": reasoning(record),
                    },
                    "finish_reason": finish_reason(record),
                }
            ],
            "usage": openai_usage(record),
            "hogwild": {"job_id": record.id, "finish_reason": record.finish_reason},
        }

    return router


async def wait_or_cancel(hub: Hub, record: JobRecord, request: Request) -> None:
    """Wait for the job to end; a client that hangs up meanwhile cancels it. The client is looked at on a
    clock of its own: a busy job changes many times a second and must not hide a hang-up."""
    loop = asyncio.get_running_loop()
    look = loop.time() + DISCONNECT_POLL_S
    while not record.ended:
        await record.changed_within(max(0.0, look - loop.time()))
        if loop.time() >= look:
            if await request.is_disconnected():
                await hub.cancel(record)
                return
            look = loop.time() + DISCONNECT_POLL_S


async def chunks(hub: Hub, record: JobRecord, completion_id: str, include_usage: bool) -> AsyncIterator[str]:
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(record.created),
        "model": hub.model_name,
    }

    def chunk(delta: dict[str, Any], reason: str | None = None) -> str:
        return json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in record.follow():
            if ev.type == "token":
                w = record.workers[ev.data["worker"]]
                delta = {"reasoning_content": ev.data["text"], "worker": w.index, "worker_name": w.name}
                yield chunk(delta)
            elif ev.type == "final":
                yield chunk({"content": ev.data["answer"]})
            elif ev.type == "error":
                yield json.dumps({"error": {"message": ev.data["message"], "type": "engine_error"}})
            elif ev.type == "done":
                yield chunk({}, finish_reason(record))
                if include_usage:
                    yield json.dumps({**base, "choices": [], "usage": openai_usage(record)})
        yield "[DONE]"
    finally:
        if not record.ended:  # the client went away mid-stream
            hub.background(hub.cancel(record))
