"""What the server knows about each job, rebuilt from the engine's events alone.

Every event is kept in order, so a stream can start at any sequence number: a reconnect with
``Last-Event-ID`` and a replay of an ended job are the same loop. Ended jobs are kept up to a limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.protocol import ENDED, STATUS_OF_REASON, Done, Error, Event, history_entry, usage


@dataclass
class WorkerState:
    index: int
    name: str
    text: str = ""
    tokens: int = 0  # every token of its text, forced ones included
    generated: int = 0  # the tokens it sampled itself
    step: int = 1
    finish_reason: str | None = None


@dataclass
class JobRecord:
    id: str
    options: dict[str, Any]
    workers: list[WorkerState]
    prompt: str | list[dict[str, str]] = ""  # as submitted: the problem, or chat messages
    engine: int = 0  # which of the server's engines runs it (the only one, but with data parallelism)
    prompt_tokens: int = 0
    status: str = "queued"
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    answer: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    first_token: float | None = None
    finished: float | None = None
    events: list[Event] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def apply(self, message: dict[str, Any]) -> Event:
        """Fold one of the engine's events into the record; it is stored, and streamed, as it came."""
        ev = Event(**message)
        data = ev.data
        if self.status == "queued":
            self.status = "running"
        if ev.type == "token":
            w = self.workers[data["worker"]]
            w.text += data["text"]
            w.tokens += 1
            if not data["forced"]:
                w.generated += 1
                if self.first_token is None:
                    self.first_token = time.time()
        elif ev.type == "step":
            self.history.append(history_entry(data))
            self.workers[data["worker"]].step = data["step"] + 1
        elif ev.type == "checkpoint":
            self.checkpoints.append(data)
        elif ev.type == "final":
            self.answer = data["answer"]
        elif ev.type == "error":
            self.error = data["message"]
        elif ev.type == "done":
            self.finish_reason = data["finish_reason"]
            self.usage = data["usage"] or self.usage
            self.status = STATUS_OF_REASON.get(self.finish_reason or "", "finished")
            self.finished = time.time()
            for w in self.workers:
                w.finish_reason = w.finish_reason or self.finish_reason
        self.events.append(ev)
        return ev

    def notify(self) -> None:
        """Wake every stream waiting on this job; they wait on a fresh event from now on."""
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    async def changed_within(self, seconds: float) -> bool:
        """Wait for the next change to this job; False if none came within ``seconds``."""
        try:
            await asyncio.wait_for(self.changed.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True

    async def follow(self, after: int = -1) -> AsyncIterator[Event]:
        """Events with seq > ``after``, live until the job ends."""
        index = max(after, -1) + 1
        while True:
            changed = self.changed
            while index < len(self.events):
                yield self.events[index]
                index += 1
            if self.ended:
                return
            await changed.wait()

    def usage_so_far(self) -> dict[str, int]:
        generated = sum(w.generated for w in self.workers)
        return usage(self.prompt_tokens, generated, sum(w.tokens for w in self.workers) - generated)

    def to_dict(self, model: str) -> dict[str, Any]:
        ttft = self.first_token - self.created if self.first_token else None
        duration = self.finished - self.created if self.finished else None
        return {
            "id": self.id,
            "object": "job",
            "status": self.status,
            "model": model,
            "engine": self.engine,
            "prompt": self.prompt,
            "options": self.options,
            "workers": [vars(w).copy() for w in self.workers],
            "history": list(self.history),
            "checkpoints": list(self.checkpoints),
            "answer": self.answer,
            "finish_reason": self.finish_reason,
            "error": self.error,
            "usage": self.usage or self.usage_so_far(),
            "timings": {
                "created": self.created,
                "first_token": self.first_token,
                "finished": self.finished,
                "ttft_s": ttft,
                "duration_s": duration,
            },
        }


class JobStore:
    def __init__(self, retain: int):
        self.retain = retain
        self.jobs: OrderedDict[str, JobRecord] = OrderedDict()

    def add(self, record: JobRecord) -> None:
        self.jobs[record.id] = record
        ended = [r.id for r in self.jobs.values() if r.ended]
        for job_id in ended[: max(0, len(ended) - self.retain)]:
            del self.jobs[job_id]

    def get(self, job_id: str) -> JobRecord | None:
        return self.jobs.get(job_id)

    def remove(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def recent(self, limit: int) -> list[JobRecord]:
        return list(reversed(self.jobs.values()))[:limit]

    def open(self) -> list[JobRecord]:
        return [r for r in self.jobs.values() if not r.ended]

    def fail_open(self, message: str, engine: int | None = None) -> None:
        """The engine is gone: every open job (of that engine) ends with an error and a done, like the
        engine would."""
        for record in self.open():
            if engine is not None and record.engine != engine:
                continue
            seq, so_far = len(record.events), record.usage_so_far()
            record.apply(Event.of(record.id, seq, Error(message)).to_dict())
            record.apply(Event.of(record.id, seq + 1, Done("error", so_far)).to_dict())
            record.notify()
