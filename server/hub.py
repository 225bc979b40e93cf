"""The server's side of its engines: submits jobs (each to the least busy ready engine, where it stays),
folds the engines' events into job records, and notices when an engine goes away."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from engine.connection import EngineAuthFailed, EngineClient, EngineRefused, EngineUnavailable
from engine.protocol import INVALID, read_secret, worker_name
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


@dataclass(eq=False)
class EngineLink:
    """One of the server's engines: spawned (``address`` None) or standalone, and what the server knows of
    it. ``client`` is set while it is up and None while it starts, restarts or is reached again."""

    index: int
    address: str | None = None
    client: EngineClient | None = None
    info: dict[str, Any] = field(default_factory=dict)  # as it last said when it came up
    error: str | None = "the engine is starting"  # why it is not up, while it is not
    stalled: str | None = None  # why it is thought stuck, while it is
    started: bool = False  # it came up once: only then is a dead one restarted
    heard_before_stall: float = 0.0  # its last word when it was found stalled
    jobs: set[str] = field(default_factory=set)  # its open jobs
    submitted: int = 0  # jobs it was given since the server started
    pending: int = 0  # submissions sent to it and not answered yet
    restarts: int = 0
    step_seconds: Any = None  # its child of the step latency histogram

    @property
    def name(self) -> str:
        return str(self.index)

    @property
    def ready(self) -> bool:
        return self.client is not None and self.error is None and self.stalled is None

    @property
    def unavailable(self) -> str | None:
        """Why it cannot take requests now, if it cannot."""
        if self.client is None or self.error is not None:
            return self.error or "the engine is not running"
        return self.stalled

    def engine(self) -> EngineClient:
        reason = self.unavailable
        if reason is not None or self.client is None:
            raise EngineUnavailable(reason or "the engine is not running")
        return self.client

    def busy(self) -> tuple[int, int, int]:
        """Routing's order, least busy first: the shortest queue (counting submissions on their way),
        then the most free pages, then the fewest running jobs; as of the engine's last message."""
        load = self.client.load if self.client is not None else {}
        return (load.get("queued", 0) + self.pending, -load.get("free_pages", 0), load.get("running", 0))

    def describe(self) -> dict[str, Any]:
        """What /ready, /health and /v1/stats say of it."""
        client, unavailable = self.client, self.unavailable
        state = "ready" if unavailable is None else "stalled" if self.stalled and client else "down"
        if state == "down" and not self.started:
            state = "starting"
        process = client.process if client is not None else None
        load = client.load if client is not None else {}
        return {
            "engine": self.index,
            "state": state,
            "reason": unavailable,
            "address": self.address,
            "pid": process.pid if process is not None and process.returncode is None else None,
            "jobs": self.submitted,
            "open_jobs": len(self.jobs),
            "running": load.get("running"),
            "queued": load.get("queued"),
            "free_pages": load.get("free_pages"),
            "restarts": self.restarts,
        }


def summed(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Several engines' ``stats`` as one: counts added, the prefix cache's hit rate recomputed."""
    total: dict[str, Any] = {}
    for key, value in answers[0].items():
        values = [a[key] for a in answers]
        total[key] = any(values) if isinstance(value, bool) else sum(values)
    queries = total.get("prefix_cache_queries", 0)
    total["prefix_cache_hit_rate"] = total.get("prefix_cache_hits", 0) / queries if queries else 0.0
    return total


class Hub:
    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.store = JobStore(settings.retain_jobs)
        addresses = settings.engine_addresses
        self.links = [EngineLink(i, a) for i, a in enumerate(addresses)] or [
            EngineLink(i) for i in range(settings.data_parallel)
        ]
        for link in self.links:
            link.step_seconds = metrics.step.labels(link.name)
            metrics.engine_up.labels(link.name).set(0)  # every engine has its series from the start
        self._last_token: dict[tuple[str, int], float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self._watch: asyncio.Task[None] | None = None

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Fire and forget (a cancel from a stream's cleanup), holding the task until it is done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def info(self) -> dict[str, Any]:
        return next((link.info for link in self.links if link.info), {})

    @property
    def model_name(self) -> str:
        return str(self.info.get("model", "hogwild"))

    @property
    def ready(self) -> bool:
        return self.unavailable is None

    @property
    def unavailable(self) -> str | None:
        """Why no engine can take requests now, if none can."""
        if len(self.links) == 1:
            return self.links[0].unavailable
        if any(link.ready for link in self.links):
            return None
        return "no engine is ready: " + "; ".join(f"{link.index}: {link.unavailable}" for link in self.links)

    def engines(self) -> list[dict[str, Any]]:
        return [link.describe() for link in self.links]

    async def start(self) -> None:
        """Start every engine at once (or reach it: a standalone one that is not up yet is retried in the
        background). A spawned engine that fails its first start raises: the set-up is wrong."""
        results = await asyncio.gather(
            *(self._first_start(link) for link in self.links), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _first_start(self, link: EngineLink) -> None:
        try:
            await self.start_engine(link)
        except Exception as exc:
            if link.address is None or not isinstance(exc, EngineUnavailable):
                link.error = f"the engine failed to start: {exc}"
                raise
            first = MAX_RESTART_DELAY_S if isinstance(exc, EngineAuthFailed) else RESTART_DELAY_S
            self.background(self.keep_starting(link, self.why_not_started(link, exc), first))

    async def start_engine(self, link: EngineLink) -> None:
        s = self.settings
        on_events = functools.partial(self.on_events, link=link)
        on_exit = functools.partial(self.on_exit, link)
        if link.address is not None:
            secret = read_secret(s.engine_secret_file) if s.engine_secret_file else None
            client = await EngineClient.connect(link.address, on_events, on_exit, s.ready_timeout_s, secret)
            if secret is not None and not client.challenged:
                log.warning(
                    "the engine at %s asked for no secret: anyone who reaches it may use it", link.address
                )
        else:
            env = s.engine_env(link.index)
            client = await EngineClient.spawn(s.engine_args(), on_events, on_exit, s.ready_timeout_s, env)
        client.timeout = s.engine_stall_s
        link.client, link.info = client, client.info
        link.error = link.stalled = None
        link.started = True
        self.metrics.engine_up.labels(link.name).set(1)
        info = client.info
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
        """Graceful: the engines cancel what is open, so every stream gets its done event. Spawned engines
        are shut down; standalone ones, which may serve other servers, are only left."""
        self.stopping = True
        if self._watch is not None:
            self._watch.cancel()
        await asyncio.gather(
            *(
                link.client.close() if link.address is None else link.client.release()
                for link in self.links
                if link.client is not None
            )
        )
        self.store.fail_open("the server is shutting down")

    # -- jobs ---------------------------------------------------------------------------------------

    def pick(self) -> EngineLink:
        """The engine a new job goes to: the least busy of the ready ones."""
        if len(self.links) == 1:
            self.links[0].engine()  # raises why not
            return self.links[0]
        ready = [link for link in self.links if link.ready]
        if not ready:
            raise EngineUnavailable(self.unavailable or "no engine is running")
        return min(ready, key=EngineLink.busy)

    def engine(self) -> EngineClient:
        """A ready engine (any: for a request that needs one to be up)."""
        return self.pick().engine()

    async def stats(self) -> dict[str, Any]:
        """Every ready engine's counters (also into /metrics), summed, with ``engines`` listing each."""
        ready = [link for link in self.links if link.ready]
        if not ready:
            raise EngineUnavailable(self.unavailable or "no engine is running")
        answers = await asyncio.gather(
            *(asyncio.wait_for(link.engine().stats(), 5) for link in ready), return_exceptions=True
        )
        by_link: dict[int, dict[str, Any]] = {}
        for link, answer in zip(ready, answers, strict=True):
            if isinstance(answer, dict):
                self.metrics.engine_stats(answer, link.name)
                by_link[link.index] = answer
            elif not isinstance(answer, (EngineUnavailable, asyncio.TimeoutError)):
                raise answer
        if not by_link:  # none answered: why the first did not
            raise next(a for a in answers if isinstance(a, BaseException))
        total = summed(list(by_link.values()))
        total["engines"] = [{**link.describe(), **by_link.get(link.index, {})} for link in self.links]
        return total

    # -- liveness -----------------------------------------------------------------------------------

    async def probe(self, timeout: float = PROBE_TIMEOUT_S) -> None:
        """Ask each engine that has been quiet for a while whether it still answers (for /ready)."""
        now = time.monotonic()
        quiet = [
            link
            for link in self.links
            if link.ready and link.client is not None and now - link.client.last_heard >= PROBE_AFTER_S
        ]
        await asyncio.gather(*(self._probe(link, timeout) for link in quiet))

    async def _probe(self, link: EngineLink, timeout: float) -> None:
        client = link.engine()
        try:
            await asyncio.wait_for(client.stats(), timeout)
        except (EngineUnavailable, asyncio.TimeoutError):
            if link.client is client and link.error is None:
                self._stall(link, f"the engine did not answer within {timeout:.0f} s")

    def _stall(self, link: EngineLink, reason: str) -> None:
        if link.stalled is None:
            log.error("%s%s", self._who(link), reason)
            link.heard_before_stall = link.client.last_heard if link.client is not None else 0.0
        link.stalled = reason
        self.metrics.engine_up.labels(link.name).set(0)

    def _who(self, link: EngineLink) -> str:
        """How a log line names an engine when there are several."""
        return f"engine {link.index}: " if len(self.links) > 1 else ""

    async def _watchdog(self) -> None:
        """A busy engine sends events every step: one that falls silent is stalled (503 meanwhile), and a
        spawned one silent for ``engine_kill_s`` is killed, which restarts it."""
        while not self.stopping:
            await asyncio.sleep(WATCH_EVERY_S)
            for link in self.links:
                self._watch_one(link)

    def _watch_one(self, link: EngineLink) -> None:
        s, client = self.settings, link.client
        if client is None or link.error is not None:
            return
        silent = time.monotonic() - client.last_heard
        busy = bool(link.jobs) or client.waiting
        if link.stalled is not None and client.last_heard > link.heard_before_stall:
            log.warning("%sthe engine answers again", self._who(link))
            link.stalled = None
            self.metrics.engine_up.labels(link.name).set(1)
        elif busy and silent > s.engine_stall_s:
            self._stall(link, f"the engine has not answered for {silent:.0f} s")
        if link.stalled is not None and silent > s.engine_kill_s and client.process is not None:
            log.error("%skilling the engine: it has not answered for %.0f s", self._who(link), silent)
            client.kill()

    async def submit(self, params: dict[str, Any], options: dict[str, Any]) -> JobRecord:
        """Queue a job on the least busy engine. The record exists before the engine is asked, since its
        first events can arrive in the same read as the reply."""
        link = self.pick()
        client = link.engine()
        where = first_surrogate(params)
        if where is not None:  # JSON can carry them (\ud800), UTF-8 cannot: the wire would fail obscurely
            where = where.replace("prompt.", "messages.", 1)  # a chat's messages travel as the prompt
            raise EngineRefused(INVALID, f"{where} holds a lone surrogate, which is not text", where)
        count, most = params.get("workers", 2), int(link.info.get("max_workers", 0))
        if not 1 <= count <= most:  # checked here too: the record holds one state per worker
            raise EngineRefused(INVALID, f"workers must be between 1 and {most}", "workers")
        job_id = f"job-{uuid.uuid4().hex[:16]}"
        workers = [WorkerState(i, worker_name(i)) for i in range(count)]
        record = JobRecord(job_id, options, workers, prompt=params["prompt"], engine=link.index)
        self.store.add(record)
        link.jobs.add(job_id)
        link.pending += 1
        try:
            result = await client.submit(job_id, params)
        except Exception as exc:
            self.store.remove(job_id)
            link.jobs.discard(job_id)
            if isinstance(exc, EngineRefused):
                self.metrics.rejected.labels(exc.code).inc()
            raise
        finally:
            link.pending -= 1
        link.submitted += 1
        record.prompt_tokens = result["prompt_tokens"]
        self.metrics.prompt_tokens.inc(record.prompt_tokens)
        record.options.update(result.get("options") or {})  # what the engine resolved (sampling, preset)
        return record

    async def cancel(self, record: JobRecord) -> None:
        if not record.ended:
            await self.links[record.engine].engine().cancel(record.id)

    # -- engine callbacks ---------------------------------------------------------------------------

    def on_events(self, message: dict[str, Any], link: EngineLink) -> None:
        link.step_seconds.observe(message.get("step_s", 0.0))
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
                link.jobs.discard(record.id)
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

    def on_exit(self, link: EngineLink, reason: str) -> None:
        """An engine that was up went away: its open jobs end with an error, the others run on, and it is
        restarted (or reached again). One that dies while starting is its starter's to report."""
        if link.client is None:
            return
        link.client, link.error, link.stalled = None, reason, None
        self.metrics.engine_up.labels(link.name).set(0)
        self.store.fail_open(f"the engine stopped: {reason}", engine=link.index)
        link.jobs.clear()
        if not self.stopping:
            again = "reconnecting" if link.address else "restarting the engine"
            self.background(self.keep_starting(link, f"{reason}; {again}"))

    def why_not_started(self, link: EngineLink, exc: Exception) -> str:
        if isinstance(exc, EngineAuthFailed):
            return str(exc)
        if link.address:
            return f"waiting for the engine at {link.address}: {exc}"
        return f"the engine failed to restart: {exc}"

    @staticmethod
    def _delay(exc: Exception, delay: float = RESTART_DELAY_S) -> float:
        """How long to wait before the next try: doubling, and the longest at once for a refused secret,
        which only a changed set-up mends."""
        return (
            MAX_RESTART_DELAY_S if isinstance(exc, EngineAuthFailed) else min(2 * delay, MAX_RESTART_DELAY_S)
        )

    async def keep_starting(self, link: EngineLink, reason: str, delay: float = RESTART_DELAY_S) -> None:
        """Start a new engine (or reach a standalone one, which may come up after the server), backing off
        while that fails; /ready says why meanwhile."""
        again = link.started
        log.error("%s%s (next try in %.0f s)", self._who(link), reason, delay)
        while not self.stopping:
            link.error = reason
            await asyncio.sleep(delay)
            try:
                await self.start_engine(link)
            except Exception as exc:
                reason, delay = self.why_not_started(link, exc), self._delay(exc, delay)
                log.error("%s%s (next try in %.0f s)", self._who(link), reason, delay)
                continue
            if again:
                link.restarts += 1
                self.metrics.restarts.inc()
                log.warning("%sengine restarted after: %s", self._who(link), reason)
            else:
                log.info("%sreached the engine at %s", self._who(link), link.address)
            return
