"""The wire between the engine process and its front ends: a stream of msgpack maps over one socket.

msgpack frames itself, so a streaming ``Unpacker`` needs no length prefix, and it decodes only plain data
(maps, lists, strings, numbers): nothing that arrives can run code, unlike pickle.

Front end to engine, each with a request number ``req`` that the reply carries back:
  ``{"type": "submit", "req", "job_id", "params": {...Engine.submit keywords}}``
  ``{"type": "cancel", "req", "job_id"}``, ``{"type": "stats", "req"}``, ``{"type": "shutdown", "req"}``
Engine to front end:
  ``{"type": "ready", "info": {...}}`` once the model is loaded, first on every connection;
  ``{"type": "reply", "req", "ok", "result" | "error", "code", "field"}``;
  ``{"type": "events", "step", "step_s", "events": [...]}``: one message per decode step with every event
  of that connection's jobs (Event.to_dict()) and how long the step took.
"""

from __future__ import annotations

from typing import Any

import msgpack

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Reply codes for refused requests; the server maps them to HTTP statuses.
INVALID, TOO_LONG, QUEUE_FULL, NOT_FOUND, SHUTTING_DOWN = (
    "invalid",
    "too_long",
    "queue_full",
    "not_found",
    "shutting_down",
)


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES, strict_map_key=True)
