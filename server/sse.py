"""The one way this server answers with server-sent events: keep-alive comments while a stream is quiet."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent


def event_source(
    content: AsyncIterable[Any], keepalive_s: float, headers: dict[str, str] | None = None
) -> EventSourceResponse:
    return EventSourceResponse(
        content,
        ping=keepalive_s,
        ping_message_factory=lambda: ServerSentEvent(comment="keep-alive"),
        headers=headers,
    )
