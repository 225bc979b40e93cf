"""OpenAI-compatible routes, so the official ``openai`` package works unchanged.

Mapping (both routes, streamed or not, go through one ``Answer``): the job's final answer is the chat
message's ``content`` (the completion's ``text``); the workers' texts are ``reasoning_content``, each
worker's part headed by its name (streamed as deltas that also carry ``worker`` and ``worker_name``).
Hogwild options (workers, layout, top_k, quick_check_every, finisher) ride in the body, which is what
``extra_body`` does. ``max_tokens`` is per worker. Finish reasons ``answer`` and ``stop`` map to ``stop``;
``length`` stays ``length``.

``stop`` has OpenAI's meaning here: a worker's text ends before its first stop string (the engine stops
the worker there; the string itself, and whatever the job writes after it, the finisher's text among it,
is not returned), the answer is cut before one too, and a job in which a stop string was met finishes
with ``stop``. ``logprobs`` cover every token the model sampled (the workers' and the finisher's, not the
forced headers), in the order they were written, each with its ``worker``: as vLLM's cover the reasoning.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.protocol import Event
from server.errors import ApiError
from server.hub import Hub
from server.records import JobRecord
from server.schemas import ChatRequest, CompletionRequest, OpenAIRequest, error_responses
from server.sse import event_source

DEFAULT_MAX_TOKENS = 512
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request looks for its client
# What each route may answer besides success, for /openapi.json: all in OpenAI's shape.
ANSWER_ERRORS = error_responses(400, 401, 404, 408, 413, 429, 500, 503, openai=True)
MODEL_ERRORS = error_responses(401, 404, 503, openai=True)


def openai_usage(record: JobRecord) -> dict[str, Any]:
    usage = record.usage or record.usage_so_far()
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": usage.get("cached_tokens", 0)},
    }


# -- a job as one answer ----------------------------------------------------------------------------


def cut_before(text: str, stops: Iterable[str], start: int = 0) -> int | None:
    """Where the first stop string found at or after ``start`` begins, if one is there."""
    found = [i for s in stops if (i := text.find(s, start)) != -1]
    return min(found) if found else None


class StopCut:
    """One worker's text as OpenAI returns it: up to its first stop string, which the engine looks for
    after each sampled token within the text's last ``longest + len(piece)`` characters (engine/job.py);
    this looks in the same window. Text that may begin a stop string is held back until the next
    token tells: a stream never sends what it would have to take back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest = max(map(len, stops), default=0)
        self.text = ""
        self.sent = 0
        self.hit = False

    def push(self, piece: str, sampled: bool) -> str:
        if self.hit:
            return ""
        self.text += piece
        end = len(self.text)
        if sampled and self.longest:
            at = cut_before(self.text, self.stops, max(0, end - self.longest - len(piece)))
            if at is not None:
                self.hit, end = True, max(self.sent, at)
            else:
                end -= self.held()
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def held(self) -> int:
        """The length of the longest end of the text that begins a stop string."""
        return max(
            (
                k
                for s in self.stops
                for k in range(min(len(s) - 1, len(self.text)), 0, -1)
                if self.text.endswith(s[:k])
            ),
            default=0,
        )

    def flush(self) -> str:
        return "" if self.hit else self.push("", sampled=False)


@dataclass
class Piece:
    """What one of the job's events adds to the answer."""

    worker: int | None = None
    reasoning: str = ""
    content: str = ""
    token: dict[str, Any] | None = None  # the sampled token's logprobs, in the chat route's shape
    error: str | None = None
    finish_reason: str | None = None


def token_logprobs(data: dict[str, Any]) -> dict[str, Any]:
    """A token event's logprobs as the chat route's ``logprobs.content`` entry (plus its worker)."""

    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    top = [entry(t["text"], t["logprob"]) for t in data.get("top_logprobs") or ()]
    return {**entry(data["text"], data["logprob"]), "top_logprobs": top, "worker": data["worker"]}


@dataclass
class Answer:
    """A job read as one OpenAI answer, event by event: a stream sends each event's ``Piece``; a
    non-streaming reply reads the whole (``texts``, ``content``, ``tokens``, ``finish_reason``)."""

    record: JobRecord
    stops: tuple[str, ...]
    cuts: list[StopCut] = field(init=False)
    texts: list[str] = field(init=False)
    content: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.cuts = [StopCut(self.stops) for _ in self.record.workers]
        self.texts = ["" for _ in self.record.workers]

    def feed(self, ev: Event) -> list[Piece]:
        data = ev.data
        if ev.type == "token":
            worker, cut = data["worker"], self.cuts[data["worker"]]
            was_hit = cut.hit
            text = cut.push(data["text"], sampled=not data["forced"])
            token = token_logprobs(data) if "logprob" in data and not was_hit and not cut.hit else None
            return self._reasoning(worker, text, token)
        if ev.type == "final":
            at = cut_before(data["answer"], self.stops)
            self.content = data["answer"][:at]
            return [Piece(content=self.content)] if self.content else []
        if ev.type == "error":
            return [Piece(error=data["message"])]
        if ev.type == "done":
            pieces = [p for w, cut in enumerate(self.cuts) for p in self._reasoning(w, cut.flush(), None)]
            stopped = any(cut.hit for cut in self.cuts) or data["finish_reason"] != "length"
            self.finish_reason = "stop" if stopped else "length"
            return [*pieces, Piece(finish_reason=self.finish_reason)]
        return []

    def _reasoning(self, worker: int, text: str, token: dict[str, Any] | None) -> list[Piece]:
        self.texts[worker] += text
        if token is not None:
            self.tokens.append(token)
        return [Piece(worker, text, token=token)] if text or token else []

    def reasoning(self) -> str:
        parts = zip(self.record.workers, self.texts, strict=True)
        return "\n\n".join(f"[{w.name}]\n{text.strip()}" for w, text in parts)


# -- the two routes' shapes -------------------------------------------------------------------------


class ChatShape:
    object, chunk_object, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, body: ChatRequest):
        self.logprobs = bool(body.logprobs)

    def opening(self) -> dict[str, Any] | None:
        return {"delta": {"role": "assistant", "content": ""}}

    def delta(self, piece: Piece, names: list[str]) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if piece.worker is not None:
            worker = piece.worker
            delta = {"reasoning_content": piece.reasoning, "worker": worker, "worker_name": names[worker]}
        elif piece.content:
            delta = {"content": piece.content}
        choice: dict[str, Any] = {"delta": delta}
        if self.logprobs:
            choice["logprobs"] = {"content": [piece.token]} if piece.token else None
        return choice

    def choice(self, answer: Answer) -> dict[str, Any]:
        message = {"role": "assistant", "content": answer.content, "reasoning_content": answer.reasoning()}
        choice: dict[str, Any] = {"message": message}
        if self.logprobs:
            choice["logprobs"] = {"content": answer.tokens}
        return choice


class CompletionShape:
    """The legacy shape: ``text``, and ``logprobs`` as parallel lists (``text_offset`` counts characters
    along the returned tokens' texts, one after the other)."""

    object, chunk_object, prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, body: CompletionRequest):
        self.logprobs = body.logprobs is not None
        self.offset = 0

    def opening(self) -> dict[str, Any] | None:
        return None

    def delta(self, piece: Piece, names: list[str]) -> dict[str, Any]:
        choice: dict[str, Any] = {"text": piece.content}
        if piece.worker is not None:
            worker = piece.worker
            choice.update(reasoning_content=piece.reasoning, worker=worker, worker_name=names[worker])
        if self.logprobs:
            choice["logprobs"] = self.legacy([piece.token] if piece.token else [])
        return choice

    def choice(self, answer: Answer) -> dict[str, Any]:
        choice: dict[str, Any] = {"text": answer.content, "reasoning_content": answer.reasoning()}
        choice["logprobs"] = self.legacy(answer.tokens) if self.logprobs else None
        return choice

    def legacy(self, tokens: list[dict[str, Any]]) -> dict[str, Any]:
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token["token"])
        return {
            "tokens": [t["token"] for t in tokens],
            "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [{a["token"]: a["logprob"] for a in t["top_logprobs"]} for t in tokens],
            "text_offset": offsets,
        }


Shape = ChatShape | CompletionShape


# -- routes -----------------------------------------------------------------------------------------


def openai_routes(hub: Hub) -> APIRouter:
    router = APIRouter()

    def not_served(model: str) -> ApiError:
        return ApiError(404, f"model {model!r} is not served here", "model_not_found", "model")

    def model_entry() -> dict[str, Any]:
        info = hub.engine().info
        created = int(info.get("created") or time.time())
        return {
            "id": hub.model_name,
            "object": "model",
            "created": created,
            "owned_by": "hogwild",
            "max_model_len": info.get("max_positions"),
        }

    @router.get("/models", responses=MODEL_ERRORS)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_entry()]}

    @router.get("/models/{model_id:path}", responses=MODEL_ERRORS)
    async def model(model_id: str) -> dict[str, Any]:
        entry = model_entry()
        if model_id != entry["id"]:
            raise not_served(model_id)
        return entry

    async def answer(request: Request, body: OpenAIRequest, shape: Shape) -> Response | dict[str, Any]:
        if body.model not in (None, "", hub.model_name):
            raise not_served(body.model)
        params = body.engine_params(DEFAULT_MAX_TOKENS)
        # What the job object shows as asked: the options, max_tokens and logprobs as the engine got them.
        record = await hub.submit(params, {k: v for k, v in params.items() if k != "prompt"})
        reply = Reply(hub, record, Answer(record, body.stops), shape)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return event_source(reply.chunks(include_usage), hub.settings.keepalive_s)
        return await reply.whole(request)

    @router.post("/chat/completions", response_model=None, responses=ANSWER_ERRORS)
    async def chat(body: ChatRequest, request: Request) -> Response | dict[str, Any]:
        return await answer(request, body, ChatShape(body))

    @router.post("/completions", response_model=None, responses=ANSWER_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response | dict[str, Any]:
        return await answer(request, body, CompletionShape(body))

    return router


@dataclass
class Reply:
    """One request's answer in its route's shape: ``whole`` once the job ended, or ``chunks`` as it runs."""

    hub: Hub
    record: JobRecord
    answer: Answer
    shape: Shape
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = f"{self.shape.prefix}-{uuid.uuid4().hex[:24]}"

    def head(self, object: str) -> dict[str, Any]:
        created = int(self.record.created)
        return {"id": self.id, "object": object, "created": created, "model": self.hub.model_name}

    async def whole(self, request: Request) -> dict[str, Any]:
        await wait_or_cancel(self.hub, self.record, request)
        if self.record.status == "failed":
            raise ApiError(500, f"the job failed: {self.record.error}", "engine_error")
        for ev in self.record.events:
            self.answer.feed(ev)
        choice = {"index": 0, **self.shape.choice(self.answer), "finish_reason": self.answer.finish_reason}
        return {
            **self.head(self.shape.object),
            "choices": [choice],
            "usage": openai_usage(self.record),
            "hogwild": {"job_id": self.record.id, "finish_reason": self.record.finish_reason},
        }

    async def chunks(self, include_usage: bool) -> AsyncIterator[str]:
        base = self.head(self.shape.chunk_object)
        names = [w.name for w in self.record.workers]

        def chunk(choice: dict[str, Any], reason: str | None = None) -> str:
            return json.dumps({**base, "choices": [{"index": 0, **choice, "finish_reason": reason}]})

        try:
            opening = self.shape.opening()
            if opening is not None:
                yield chunk(opening)
            async for ev in self.record.follow():
                for piece in self.answer.feed(ev):
                    if piece.error is not None:
                        error = ApiError(500, piece.error, "engine_error").openai_error(500)
                        yield json.dumps({"error": error})
                    elif piece.finish_reason is not None:
                        yield chunk(self.shape.delta(Piece(), names), piece.finish_reason)
                    else:
                        yield chunk(self.shape.delta(piece, names))
            if include_usage:
                yield json.dumps({**base, "choices": [], "usage": openai_usage(self.record)})
            yield "[DONE]"
        finally:
            if not self.record.ended:  # the client went away mid-stream
                self.hub.background(self.hub.cancel(self.record))


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
