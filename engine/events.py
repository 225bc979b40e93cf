"""What the engine reports: one flat record type, easy to serialize for the IPC channel and SSE."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

EVENT_TYPES = ("token", "step", "quick_check", "checkpoint", "final", "done", "error")


@dataclass
class Event:
    """``seq`` numbers a job's events from 0 without gaps. ``token`` events carry every token entering a
    worker's text; ``forced`` marks those the engine wrote for it (openers, headers, checks, finisher)."""

    type: str
    job_id: str
    seq: int
    worker: int | None = None
    token_id: int | None = None
    text: str = ""
    forced: bool = False
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
