"""Hogwild! inference engine: N workers of one model sharing one paged, concurrent KV cache.

The names below load on first use: a front end that needs only ``engine.protocol`` and ``engine.connection``
(the HTTP server) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.engine import Engine
    from engine.errors import InvalidRequest, PromptTooLong, QueueFullError
    from engine.job import Job
    from engine.layers.rotary import UnsupportedModelError
    from engine.protocol import EngineOptions, Event

_WHERE = {
    "Engine": "engine.engine",
    "EngineOptions": "engine.protocol",
    "Event": "engine.protocol",
    "InvalidRequest": "engine.errors",
    "Job": "engine.job",
    "PromptTooLong": "engine.errors",
    "QueueFullError": "engine.errors",
    "UnsupportedModelError": "engine.layers.rotary",
}
__all__ = [
    "Engine",
    "EngineOptions",
    "Event",
    "InvalidRequest",
    "Job",
    "PromptTooLong",
    "QueueFullError",
    "UnsupportedModelError",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
