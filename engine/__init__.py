"""Hogwild! inference engine: N workers of one model sharing one paged, concurrent KV cache."""

from engine.engine import Engine, EngineOptions
from engine.errors import InvalidRequest, PromptTooLong, QueueFullError
from engine.events import Event
from engine.job import Job
from engine.layers.rotary import UnsupportedModelError

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
