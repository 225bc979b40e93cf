"""The server's side of the engine: submits jobs, folds the engine's events into job records, and notices
when the engine goes away."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import Any

from engine.connection import EngineClient, EngineRefused, EngineUnavailable
from engine.protocol import INVALID, worker_name
from server.metrics import Metrics
from server.records import JobRecord, JobStore, WorkerState
from server.settings import Settings

log = logging.getLogger("hogwild.server")
WATCH_EVERY_S = 0.25  # how often the watchdog looks at a busy engine
PROBE_AFTER_S = 5.0  # /ready asks an engine quiet for this long whether it still answers
PROBE_TIMEOUT_S = 2.0
RESTART_DELAY_S = 1.0  # a dead engine is restarted after this, doubling while restarts fail
MAX_RESTART_DELAY_S = 30.0


def first_surrogate(value: Any, path: str = "") -> str | None:
    """Where in a request's data a string holds a lone surrogate (``messages.0.content``), if anywhere."""
    if isinstance(value, str):
        return path or "prompt" if any("\ud800" <= c <= "\udfff" for c in value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = first_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


class Hub:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.store = JobStore(settings.retain_jobs)
        self.client: EngineClient | None = None
        self.engine_error: str | None = "the engine is starting"
        self._last_token: dict[tuple[str, int], float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self.stalled: str | None = None  # why the engine is thought stuck, while it is
        self.started = False  # an engine came up once: only then is a dead one restarted
        self._heard_before_stall = 0.0  # the engine's last word when it was found stalled
        self._watch: asyncio.Task[None] | None = None

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Fire and forget (a cancel from a stream's cleanup), holding the task until it is done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def info(self) -> dict[str, Any]:
        return self.client.info if self.client else {}

    @property
    def model_name(self) -> str:
        return str(self.info.get("model", "hogwild"))

    @property
    def ready(self) -> bool:
        return self.client is not None and self.engine_error is None and self.stalled is None

    @property
    def unavailable(self) -> str | None:
        """Why the engine cannot take requests now, if it cannot."""
        if self.client is None or self.engine_error is not None:
            return self.engine_error or "the engine is not running"
        return self.stalled

    async def start(self) -> None:
        s = self.settings
        if s.engine_address:
            self.client = await EngineClient.connect(
                s.engine_address, self.on_events, self.on_exit, s.ready_timeout_s
            )
        else:
            self.client = await EngineClient.spawn(
                s.engine_args(), self.on_events, self.on_exit, s.ready_timeout_s
            )
        self.client.timeout = s.engine_stall_s
        self.engine_error = self.stalled = None
        self.started = True
        self.metrics.engine_up.set(1)
        info = self.client.info
        self.metrics.model.info(
            {
                "model_name": self.model_name,
                "device": str(info.get("device")),
                "dtype": str(info.get("dtype")),
            }
        )
        if self._watch is None:
            self._watch = asyncio.create_task(self._watchdog())

    async def stop(self) -> None:
        """Graceful: the engine cancels what is open, so every stream gets its done event."""
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
        if self.client is not None:
            await self.client.close()
        self.store.fail_open("the server is shutting down")

    # -- jobs ---------------------------------------------------------------------------------------

    def engine(self) -> EngineClient:
        reason = self.unavailable
        if reason is not None or self.client is None:
            raise EngineUnavailable(reason or "the engine is not running")
        return self.client

    # -- liveness -----------------------------------------------------------------------------------

    async def probe(self, timeout: float = PROBE_TIMEOUT_S) -> None:
        """Ask an engine that has been quiet for a while whether it still answers (for /ready)."""
        client = self.client
        if not self.ready or client is None or time.monotonic() - client.last_heard < PROBE_AFTER_S:
            return
        try:
            await asyncio.wait_for(client.stats(), timeout)
        except (EngineUnavailable, asyncio.TimeoutError):
            if self.client is client and self.engine_error is None:
                self._stall(client, f"the engine did not answer within {timeout:.0f} s")

    def _stall(self, client: EngineClient, reason: str) -> None:
        if self.stalled is None:
            log.error("%s", reason)
            self._heard_before_stall = client.last_heard
        self.stalled = reason
        self.metrics.engine_up.set(0)

    async def _watchdog(self) -> None:
        """A busy engine sends events every step: one that falls silent is stalled (503 meanwhile), and a
        spawned one silent for ``engine_kill_s`` is killed, which restarts it."""
        s = self.settings
        while not self.stopping:
            await asyncio.sleep(WATCH_EVERY_S)
            client = self.client
            if client is None or self.engine_error is not None:
                continue
            silent = time.monotonic() - client.last_heard
            busy = bool(self.store.open()) or client.waiting
            if self.stalled is not None and client.last_heard > self._heard_before_stall:
                log.warning("the engine answers again")
                self.stalled = None
                self.metrics.engine_up.set(1)
            elif busy and silent > s.engine_stall_s:
                self._stall(client, f"the engine has not answered for {silent:.0f} s")
            if self.stalled is not None and silent > s.engine_kill_s and client.process is not None:
                log.error("killing the engine: it has not answered for %.0f s", silent)
                client.kill()

    async def submit(self, params: dict[str, Any], options: dict[str, Any]) -> JobRecord:
        """Queue a job. The record exists before the engine is asked, since its first events can arrive
        in the same read as the reply."""
        client = self.engine()
        where = first_surrogate(params)
        if where is not None:  # JSON can carry them (\ud800), UTF-8 cannot: the wire would fail obscurely
            where = where.replace("prompt.", "messages.", 1)  # a chat's messages travel as the prompt
            raise EngineRefused(INVALID, f"{where} holds a lone surrogate, which is not text", where)
        count, most = params.get("workers", 2), int(self.info.get("max_workers", 0))
        if not 1 <= count <= most:  # checked here too: the record holds one state per worker
            raise EngineRefused(INVALID, f"workers must be between 1 and {most}", "workers")
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        workers = [WorkerState(i, worker_name(i)) for i in range(count)]
        record = JobRecord(job_id, options, workers, prompt=params["prompt"])
        self.store.add(record)
        try:
            result = await client.submit(job_id, params)
        except Exception as exc:
            self.store.remove(job_id)
            if isinstance(exc, EngineRefused):
                self.metrics.rejected.labels(exc.code).inc()
            raise
        record.prompt_tokens = result["prompt_tokens"]
        self.metrics.prompt_tokens.inc(record.prompt_tokens)
        record.options.update(result.get("options") or {})  # what the engine resolved (sampling, preset)
        return record

    async def cancel(self, record: JobRecord) -> None:
        if not record.ended:
            await self.engine().cancel(record.id)

    # -- engine callbacks ---------------------------------------------------------------------------

    def on_events(self, message: dict[str, Any]) -> None:
        self.metrics.step.observe(message.get("step_s", 0.0))
        now = time.time()
        touched: dict[str, JobRecord] = {}
        for ev in message["events"]:
            record = self.store.get(ev["job_id"])
            if record is None:
                continue
            if record.status == "queued":
                self.metrics.queue_time.observe(now - record.created)
            sse = record.apply(ev)
            touched[record.id] = record
            if sse.type == "token":
                self._count_token(record, sse.data, now)
            elif sse.type == "done":
                self.metrics.jobs.labels(record.finish_reason).inc()
                self.metrics.e2e.observe(now - record.created)
                for w in record.workers:
                    self._last_token.pop((record.id, w.index), None)
        for record in touched.values():
            record.notify()

    def _count_token(self, record: JobRecord, data: dict[str, Any], now: float) -> None:
        if data["forced"]:
            self.metrics.forced.inc()
            return
        self.metrics.tokens.inc()
        key = (record.id, data["worker"])
        previous = self._last_token.get(key)
        if previous is not None:
            self.metrics.itl.observe(now - previous)
        elif sum(w.generated for w in record.workers) == 1:
            self.metrics.ttft.observe(now - record.created)
        self._last_token[key] = now

    def on_exit(self, reason: str) -> None:
        self.engine_error = reason
        self.metrics.engine_up.set(0)
        self.store.fail_open(f"the engine stopped: {reason}")
        if not self.stopping and self.started:  # one that never came up is the set-up's fault: see app.py
            again = "reconnecting" if self.settings.engine_address else "restarting the engine"
            self.background(self.keep_starting(f"{reason}; {again}"))

    def why_not_started(self, exc: Exception) -> str:
        address = self.settings.engine_address
        return (
            f"waiting for the engine at {address}: {exc}"
            if address
            else f"the engine failed to restart: {exc}"
        )

    async def keep_starting(self, reason: str) -> None:
        """Start a new engine (or reach a standalone one, which may come up after the server), backing off
        while that fails; /ready says 503 with the reason meanwhile."""
        delay, again = RESTART_DELAY_S, self.started
        while not self.stopping:
            self.engine_error = reason
            await asyncio.sleep(delay)
            try:
                await self.start()
            except Exception as exc:
                reason, delay = self.why_not_started(exc), min(2 * delay, MAX_RESTART_DELAY_S)
                log.error("%s (next try in %.0f s)", reason, delay)
                continue
            if again:
                self.metrics.restarts.inc()
                log.warning("engine restarted after: %s", reason)
            return
