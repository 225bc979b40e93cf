"""Why the engine refuses a submission; the server maps each class to an HTTP status."""

from __future__ import annotations


class QueueFullError(RuntimeError):
    """The bounded queue is full: the caller should retry later (HTTP 429)."""


class InvalidRequest(ValueError):
    """A submission refused before it is queued; ``field`` names the offending input (HTTP 422)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class PromptTooLong(InvalidRequest):
    """The prompt and the token budget cannot fit the model's positions or the pool (HTTP 413)."""
