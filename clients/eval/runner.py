"""Running the jobs: ``--concurrency`` in flight, answers read at every budget, records appended as they come.

One *unit* is a problem under a system; it needs one job (W for self-consistency) and yields one record
per budget. Identical job bodies are run once per problem: ``sc-w2``'s samples are the first two of
``sc-w4``'s (same seeds), so both systems share them. A job that fails (an error answer, a lost stream, a
failed or cancelled job, a missing checkpoint) gives records with verdict ``error``, never ``wrong``, and a
later ``--resume`` runs its unit again; the last record for a (problem, system, budget) wins.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from clients.client import Event, HogwildClient, HogwildError
from clients.eval.data import Problem, prompt_text
from clients.eval.scoring import Scorer, majority_vote
from clients.eval.systems import System, job_bodies

RESULTS = "results.jsonl"
QUEUE_WAIT_S = 3600.0  # how long a job keeps retrying 429 (full queue) before it counts as an error
UNAVAILABLE_RETRIES = 5  # 503 (engine restarting) and unreachable server: attempts, with back-off
# Fields whose refusal (422) is about the run's configuration, not one problem: the run stops.
PROBLEM_FIELDS = ("prompt", "messages")


class FatalError(RuntimeError):
    """The server refused something every job needs (a field, the key): stop the run and say why."""


@dataclass
class Checkpoint:
    budget: int
    answer: str | None
    tokens: int
    latency_s: float | None = None  # from the job's acceptance to the checkpoint event's arrival


@dataclass
class JobResult:
    job_id: str | None
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)
    status: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int | None = None
    duration_s: float | None = None


class Client(Protocol):
    """What a job needs of ``HogwildClient`` (tests pass fakes)."""

    def submit(self, prompt: str | None = None, **options: Any) -> dict[str, Any]: ...
    def events(self, job_id: str) -> Iterable[Event]: ...
    def get(self, job_id: str) -> dict[str, Any]: ...
    def cancel(self, job_id: str) -> dict[str, Any]: ...


def _checkpoint(data: dict[str, Any], latency: float | None) -> Checkpoint:
    answer = data.get("answer")
    return Checkpoint(
        int(data["budget"]), None if answer is None else str(answer), int(data.get("tokens") or 0), latency
    )


def submit_with_retry(
    client: Client,
    body: dict[str, Any],
    stop: threading.Event,
    sleep: Callable[[float], Any] = time.sleep,
    queue_wait_s: float = QUEUE_WAIT_S,
) -> dict[str, Any]:
    """``POST /v1/jobs``, waiting out 429 for its ``Retry-After`` (1 s without one) and retrying 503 and an
    unreachable server a few times with back-off. Raises ``FatalError`` for what no retry can fix."""
    deadline = time.monotonic() + queue_wait_s
    unavailable = 0
    options = {k: v for k, v in body.items() if k != "prompt"}
    while True:
        if stop.is_set():
            raise HogwildError(0, "run stopped before the job was submitted")
        try:
            return client.submit(body.get("prompt"), **options)
        except HogwildError as exc:
            if exc.status == 429 and time.monotonic() < deadline:
                sleep(max(0.05, exc.retry_after if exc.retry_after is not None else 1.0))
                continue
            if exc.status in (0, 502, 503, 504) and unavailable < UNAVAILABLE_RETRIES:
                sleep(min(30.0, 2.0**unavailable))
                unavailable += 1
                continue
            if exc.status in (401, 403):
                raise FatalError(f"the server refused the API key ({exc}); pass --api-key") from exc
            if exc.status == 422 and exc.field not in PROBLEM_FIELDS:
                hint = ""
                if exc.field in ("checkpoints", "layout", "instructions"):
                    hint = " (this server predates answer checkpoints, layout 'plain' or instruction presets)"
                raise FatalError(f"the server refused the job: {exc}{hint}") from exc
            raise


def run_job(
    client: Client,
    body: dict[str, Any],
    stop: threading.Event | None = None,
    on_submitted: Callable[[str], None] | None = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> JobResult:
    """Submits one job, follows its events to ``done`` and reads the ended job: the answer at every
    checkpoint, when each arrived, and how the job ended. Errors become ``JobResult.error``."""
    stop = stop or threading.Event()
    try:
        job = submit_with_retry(client, body, stop, sleep)
    except HogwildError as exc:
        return JobResult(None, error=f"submit: {exc}")
    job_id = str(job["id"])
    if on_submitted is not None:
        on_submitted(job_id)
    t0 = time.monotonic()
    result = JobResult(job_id)
    try:
        for event in client.events(job_id):
            if event.type == "checkpoint":
                cp = _checkpoint(event.data, time.monotonic() - t0)
                result.checkpoints.setdefault(cp.budget, cp)
            elif event.type == "error":
                result.error = str(event.data.get("message") or "job error")
            elif event.type == "done":
                result.finish_reason = event.data.get("finish_reason")
    except HogwildError as exc:
        result.error = f"events: {exc}"
    elapsed = time.monotonic() - t0
    try:
        final = client.get(job_id)
    except HogwildError as exc:
        result.error = result.error or f"get: {exc}"
        return result
    result.status = final.get("status")
    result.finish_reason = final.get("finish_reason") or result.finish_reason
    result.error = result.error or final.get("error")
    result.completion_tokens = (final.get("usage") or {}).get("completion_tokens")
    result.duration_s = (final.get("timings") or {}).get("duration_s")
    for data in final.get("checkpoints") or []:
        cp = _checkpoint(data, None)
        known = result.checkpoints.get(cp.budget)
        # The job object is the record; the stream only adds when each answer arrived.
        result.checkpoints[cp.budget] = Checkpoint(
            cp.budget, cp.answer, cp.tokens, known.latency_s if known else elapsed
        )
    if result.status in ("failed", "cancelled") and not result.error:
        result.error = f"job {result.status}"
    return result


def unit_records(
    problem: Problem,
    system: System,
    budgets: Sequence[int],
    results: Sequence[JobResult],
    scorer: Scorer,
) -> list[dict[str, Any]]:
    """One record per budget for a problem under a system, from its job(s)."""
    records = []
    for budget in sorted(set(budgets)):
        cps = [r.checkpoints.get(budget) for r in results]
        record: dict[str, Any] = {
            "problem_id": problem.id,
            "system": system.name,
            "budget": budget,
            "workers": system.workers,
            "answer": None,
            "reference": problem.reference,
            "verdict": "error",
            "correct": None,
            "tokens": None,
            "latency_s": None,
            "job_ids": [r.job_id for r in results],
            "finish_reasons": [r.finish_reason for r in results],
            "error": None,
            "scorer": scorer.name,
            "time": round(time.time(), 3),
        }
        missing = [r for r, cp in zip(results, cps, strict=True) if cp is None]
        if missing:
            r = missing[0]
            why = r.error or f"no checkpoint at {budget} (job {r.status}, {r.finish_reason})"
            record["error"] = why
            records.append(record)
            continue
        present = [cp for cp in cps if cp is not None]
        answers = [cp.answer for cp in present]
        if system.kind == "sc":
            answer, votes = majority_vote(answers, scorer)
            record.update(samples=answers, votes=votes)
        else:
            answer = answers[0]
        correct = scorer.correct(answer, problem.reference)
        latencies = [cp.latency_s for cp in present if cp.latency_s is not None]
        record.update(
            answer=answer,
            verdict="correct" if correct else "wrong",
            correct=correct,
            tokens=sum(cp.tokens for cp in present),
            latency_s=round(max(latencies), 3) if latencies else None,
        )
        records.append(record)
    return records


def read_results(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Records by (problem, system, budget), the last line for a key winning; a torn last line (the run
    was killed mid-write) is skipped."""
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            out[(str(rec["problem_id"]), str(rec["system"]), int(rec["budget"]))] = rec
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _last_char(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1).decode("latin-1")


def unit_done(
    records: dict[tuple[str, str, int], dict[str, Any]], problem_id: str, system: str, budgets: Sequence[int]
) -> bool:
    return all(
        (rec := records.get((problem_id, system, b))) is not None and rec.get("verdict") != "error"
        for b in budgets
    )


@dataclass
class Unit:
    problem: Problem
    system: System
    keys: list[str]  # the unit's jobs, by body


@dataclass
class Progress:
    """What the display needs as the run goes: jobs, units and the records written so far."""

    jobs_total: int = 0
    jobs_done: int = 0
    units_total: int = 0
    units_done: int = 0
    skipped_units: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    completion_tokens: int = 0


@dataclass
class Run:
    problems: Sequence[Problem]
    systems: Sequence[System]
    budgets: Sequence[int]
    scorer: Scorer
    out_dir: Path
    job_runner: Callable[[dict[str, Any], threading.Event, Callable[[str], None]], JobResult]
    canceller: Callable[[str], Any] | None = None
    concurrency: int = 4
    resume: bool = False
    template: str = "{problem}"
    body_options: dict[str, Any] = field(default_factory=dict)
    on_update: Callable[[Progress], None] | None = None

    def plan(self) -> tuple[list[Unit], dict[str, dict[str, Any]], int]:
        """The units still to do (all, or those ``--resume`` finds unfinished) and their unique jobs."""
        done = read_results(self.out_dir / RESULTS) if self.resume else {}
        units: list[Unit] = []
        bodies: dict[str, dict[str, Any]] = {}
        skipped = 0
        for problem in self.problems:
            prompt = prompt_text(problem, self.template)
            for system in self.systems:
                if unit_done(done, problem.id, system.name, self.budgets):
                    skipped += 1
                    continue
                keys = []
                for body in job_bodies(system, prompt, problem.id, self.budgets, **self.body_options):
                    key = json.dumps(body, sort_keys=True)
                    bodies.setdefault(key, body)
                    keys.append(key)
                units.append(Unit(problem, system, keys))
        return units, bodies, skipped

    def execute(self) -> Progress:
        """Runs every planned job; returns when all are done. On Ctrl-C (or a fatal error) the jobs in
        flight are cancelled on the server, the records written so far stay, and the exception goes on."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        units, bodies, skipped = self.plan()
        progress = Progress(len(bodies), 0, len(units), 0, skipped)
        stop = threading.Event()
        in_flight: set[str] = set()
        lock = threading.Lock()

        def submitted(job_id: str) -> None:
            with lock:
                in_flight.add(job_id)
            if stop.is_set() and self.canceller is not None:  # submitted while the run was stopping
                with contextlib.suppress(Exception):
                    self.canceller(job_id)

        def one(key: str) -> JobResult:
            result = self.job_runner(bodies[key], stop, submitted)
            with lock:
                in_flight.discard(result.job_id or "")
            return result

        waiting: dict[str, list[Unit]] = {}
        for unit in units:
            for key in unit.keys:
                waiting.setdefault(key, []).append(unit)
        results: dict[str, JobResult] = {}
        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency), thread_name_prefix="eval-job")
        futures: dict[Future[JobResult], str] = {}
        try:
            # Jobs go in problem order, so units complete (and records appear) roughly in order.
            futures = {pool.submit(one, key): key for key in bodies}
            pending = set(futures)
            if self.on_update:
                self.on_update(progress)
            with open(self.out_dir / RESULTS, "a+", encoding="utf-8") as out:
                if out.tell() and _last_char(self.out_dir / RESULTS) != "\n":
                    out.write("\n")  # a line torn by a killed run stays alone (and is skipped)
                while pending:
                    finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in finished:
                        key = futures[future]
                        results[key] = future.result()  # FatalError comes out here
                        progress.jobs_done += 1
                        progress.completion_tokens += results[key].completion_tokens or 0
                        for unit in waiting.pop(key, []):
                            if all(k in results for k in unit.keys):
                                recs = unit_records(
                                    unit.problem,
                                    unit.system,
                                    self.budgets,
                                    [results[k] for k in unit.keys],
                                    self.scorer,
                                )
                                for rec in recs:
                                    out.write(json.dumps(rec) + "\n")
                                out.flush()
                                progress.records.extend(recs)
                                progress.units_done += 1
                    if finished and self.on_update:
                        self.on_update(progress)
        except BaseException:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            with lock:
                open_jobs = list(in_flight)
            for job_id in open_jobs:
                if self.canceller is not None:
                    # The run is ending anyway; a job that cannot be cancelled ends at its budget.
                    with contextlib.suppress(Exception):
                        self.canceller(job_id)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return progress


class ClientPool:
    """One ``HogwildClient`` per thread (each with its own connections), closed together at the end."""

    def __init__(self, url: str, api_key: str | None, stream_timeout: float = 600.0) -> None:
        self.url, self.api_key, self.stream_timeout = url, api_key, stream_timeout
        self._local = threading.local()
        self._all: list[HogwildClient] = []
        self._lock = threading.Lock()

    def get(self) -> HogwildClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = HogwildClient(self.url, api_key=self.api_key, stream_timeout=self.stream_timeout)
            self._local.client = client
            with self._lock:
                self._all.append(client)
        return client

    def run(self, body: dict[str, Any], stop: threading.Event, submitted: Callable[[str], None]) -> JobResult:
        return run_job(self.get(), body, stop, submitted)

    def cancel(self, job_id: str) -> None:
        with HogwildClient(self.url, api_key=self.api_key, timeout=5.0) as client:
            client.cancel(job_id)

    def close(self) -> None:
        with self._lock:
            for client in self._all:
                client.close()
            self._all.clear()
