"""A small synchronous client for the Hogwild! HTTP API (docs/API.md), built on httpx.

It exists so that scripts and the ``hogwild`` command need neither torch nor the engine: only the HTTP
contract. Server-sent events are parsed here rather than with a third-party package because the format is
a few lines of text and the reconnect rule (``Last-Event-ID``) is part of what callers rely on.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

# Events after which the server closes the stream: nothing follows ``done``.
TERMINAL_EVENT = "done"


class HogwildError(Exception):
    """An error answer from the server (or a stream that could not be completed).

    ``status`` is the HTTP status (0 when the server never answered); ``type`` and ``field`` come from the
    server's error body so that callers can tell a bad option from a full queue without parsing text.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        field: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.type = type
        self.field = field
        self.retry_after = retry_after

    @classmethod
    def from_response(cls, response: httpx.Response) -> HogwildError:
        """Reads the JSON error body when there is one; a proxy's HTML page still yields a useful message."""
        message, type_, field = response.reason_phrase or "error", None, None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            err = body["error"]
            message = str(err.get("message") or message)
            type_, field = err.get("type"), err.get("field")
        elif isinstance(body, dict) and "detail" in body:
            message = str(body["detail"])
        elif response.text:
            message = response.text[:500]
        retry = response.headers.get("retry-after")
        try:
            retry_after = float(retry) if retry is not None else None
        except ValueError:
            retry_after = None
        return cls(response.status_code, message, type_, field, retry_after)


@dataclass(frozen=True)
class Event:
    """One server-sent event: ``id`` is the job's event sequence number, ``data`` the decoded JSON."""

    id: int | None
    type: str
    data: dict[str, Any]


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str | None, str, str]]:
    """Yields ``(id, event, data)`` for each event in a stream of lines (line endings already removed).

    Follows the WHATWG rules that matter here: ``data`` lines are joined with newlines, comments (lines
    starting with ``:``) are skipped, a field without a colon has an empty value, one leading space after
    the colon is dropped, and an event is dispatched at a blank line only if it had data.
    """
    event_id: str | None = None
    event_type = ""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_id, event_type or "message", "\n".join(data)
            event_type, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and "\0" not in value:
            event_id = value  # the last id persists across events, as in the spec
    # Data left without a closing blank line belongs to a cut stream: the spec drops it, and so do we.


class HogwildClient:
    """Talks to one server. Use as a context manager, or call ``close()``, to release its connections.

    ``timeout`` bounds connecting and every ordinary request; ``stream_timeout`` bounds the silence on an
    event stream, which the server fills with keep-alive comments, so it only fires on a dead connection.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = 30.0,
        stream_timeout: float = 120.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.stream_timeout = stream_timeout
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def __enter__(self) -> HogwildClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise HogwildError(0, f"cannot reach {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise HogwildError.from_response(response)
        return response.json()

    def submit(self, prompt: str | None = None, **options: Any) -> dict[str, Any]:
        """Starts a job and returns its object. Options are the body fields of ``POST /v1/jobs``; ``None``
        values are left out so that the server's defaults apply. Pass ``messages=[...]`` instead of a prompt
        for a chat."""
        body = {k: v for k, v in {"prompt": prompt, **options}.items() if v is not None}
        return dict(self._request("POST", "/v1/jobs", json=body))

    def get(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/jobs/{job_id}"))

    def list(self) -> list[dict[str, Any]]:
        """Recent jobs, newest first. Accepts both a bare array and OpenAI's ``{"data": [...]}`` envelope."""
        body = self._request("GET", "/v1/jobs")
        return list(body["data"] if isinstance(body, dict) else body)

    def models(self) -> builtins.list[dict[str, Any]]:
        return builtins.list(self._request("GET", "/v1/models")["data"])

    def events(
        self, job_id: str, last_event_id: int | None = None, retries: int = 3
    ) -> Generator[Event, None, None]:
        """Yields the job's events up to and including ``done``, starting after ``last_event_id``.

        A dropped connection is reopened with ``Last-Event-ID`` (at most ``retries`` times in a row), so
        the caller sees every event exactly once even across reconnects; events already seen are skipped
        in case a server resends them.
        """
        last = last_event_id
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            timeout = httpx.Timeout(self._http.timeout.connect, read=self.stream_timeout)
            try:
                with self._http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise HogwildError.from_response(response)
                    for raw_id, kind, raw in parse_sse(response.iter_lines()):
                        seq = int(raw_id) if raw_id is not None and raw_id.isdigit() else None
                        if seq is not None and last is not None and seq <= last:
                            continue
                        failures = 0
                        event = Event(seq, kind, json.loads(raw) if raw else {})
                        if seq is not None:
                            last = seq
                        yield event
                        if kind == TERMINAL_EVENT:
                            return
            except httpx.TransportError as exc:
                failures += 1
                if failures > retries:
                    raise HogwildError(0, f"event stream of {job_id} lost: {exc}") from exc
                continue
            # The server closed the stream before ``done``: reconnect, the same as after an error.
            failures += 1
            if failures > retries:
                raise HogwildError(0, f"event stream of {job_id} ended before its done event")

    def run(
        self,
        prompt: str | None = None,
        *,
        on_event: Callable[[dict[str, Any], Event], None] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Submits a job, follows its events to ``done`` and returns the ended job's object.

        ``on_event(job, event)`` sees every event as it arrives, with the job object as submitted (its
        worker names in particular), which is what a live display needs.
        """
        job = self.submit(prompt, **options)
        for event in self.events(job["id"]):
            if on_event is not None:
                on_event(job, event)
        return self.get(job["id"])
