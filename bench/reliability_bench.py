"""What the server holds under abuse, as figures: ``python -m bench reliability``.

Each part sends traffic to one server on 127.0.0.1 (``--url``, or one it starts on ``--model``) and counts
what a user would call a failure:

- ``bad``: every field of every request body (jobs, chat, completions) given a value of each JSON type
  its schema forbids, and one past each bound, plus malformed bodies. Counts 5xx, values accepted that
  the schema forbids, and 4xx whose error names no field (``field``, or OpenAI's ``param``) or the wrong
  one.
- ``fuzz``: schemathesis against ``/openapi.json``, valid and invalid cases for every operation, a fixed
  budget of cases (``--fuzz-cases``). Counts 5xx. A slow answer is cut after a few seconds: hanging up
  is a case too.
- ``churn``: ``--churn-jobs`` jobs, ``--concurrency`` at a time, each ended one of four ways: read to
  ``done``, hung up after its first events, deleted, or read with its connection dropped and resumed with
  ``Last-Event-ID``. Counts 5xx, jobs whose events have a gap or a repeat, jobs not ended as they should.
  While it runs, ``/health`` is polled every 50 ms: its p99 is the server's responsiveness under load.
- ``hangup``: a streaming client hangs up while other jobs run; the time until its job is cancelled.
- ``engine`` (needs a server this benchmark started): the engine stopped with SIGSTOP (time until
  ``/ready`` is 503, how long a POST takes to be refused), then ``kill -9`` (time until 503, until a new
  engine is ready).
- ``soak``: churn for ``--soak-s`` seconds, with the server's and engine's RSS at the start and the end.

After every part the engine's pool must be whole again (every page free or evictable): ``leaked_pages``
is what is missing. ``tests/test_reliability.py`` runs the cheap parts on a small budget in ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from bench import common
from bench.server_process import ServerProcess, running_server
from clients.client import HogwildClient, HogwildError

PROMPT = "Count to ten, one number per line."
WAIT_S = 120.0  # a hang guard for anything the server should do soon; never a speed requirement
ENDED = ("finished", "cancelled", "failed")
WRONG_VALUES: dict[str, Any] = {
    "string": "x",
    "integer": 7,
    "number": 0.5,
    "boolean": True,
    "array": [1],
    "object": {"a": 1},
    "null": None,
}


@dataclass
class Tally:
    """Answers counted by what is wrong with them; ``examples`` keeps the first few for the report."""

    cases: int = 0
    server_errors: int = 0
    wrong: int = 0
    examples: list[str] = field(default_factory=list)

    def count(self, status: int, bad: str | None, case: str) -> None:
        self.cases += 1
        if status >= 500:
            self.server_errors += 1
        elif bad is None:
            return
        else:
            self.wrong += 1
        if len(self.examples) < 10:
            self.examples.append(f"{case}: {status} {bad or ''}".strip())


def client(url: str, api_key: str | None, timeout: float = 30.0) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=timeout)


def leaked_pages(http: httpx.Client) -> int:
    """Pages neither free nor evictable once every job has ended (waits for running jobs to end)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        stats = http.get("/v1/stats").json()
        if stats["running"] == stats["queued"] == 0 or time.monotonic() > deadline:
            return int(stats["total_pages"] - stats["free_pages"])
        time.sleep(0.1)


def cancel_everything(http: httpx.Client) -> None:
    for job in http.get("/v1/jobs", params={"limit": 1000}).json()["data"]:
        if job["status"] not in ENDED:
            http.delete(f"/v1/jobs/{job['id']}")


# ---- bad inputs ----------------------------------------------------------------------------------------


def allowed_types(schema: dict[str, Any]) -> set[str]:
    """The JSON types a property's schema admits (an integer is also a number)."""
    if "anyOf" in schema or "oneOf" in schema:
        return set().union(*(allowed_types(s) for s in schema.get("anyOf", schema.get("oneOf", []))))
    if "$ref" in schema:
        return {"object"}
    kind = schema.get("type")
    types = {kind} if isinstance(kind, str) else set(kind or WRONG_VALUES)
    return types | ({"integer"} if "number" in types else set())


def out_of_bounds(schema: dict[str, Any]) -> Iterator[Any]:
    for sub in schema.get("anyOf", [schema]):
        if "minimum" in sub:
            yield int(sub["minimum"]) - 1
        if "maximum" in sub and sub["maximum"] < 2**40:
            yield int(sub["maximum"]) + 1
        if "maxLength" in sub and sub.get("type") == "string":
            yield "x" * (int(sub["maxLength"]) + 1)
        if "maxItems" in sub:
            yield [1] * (int(sub["maxItems"]) + 1)


# Each route with a JSON body, and its schema's name in /openapi.json.
ROUTE_BODIES = {
    "/v1/jobs": "JobRequest",
    "/v1/chat/completions": "ChatRequest",
    "/v1/completions": "CompletionRequest",
}


def bad_bodies(doc: dict[str, Any], route: str, strict: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field, body) pairs whose one wrong field the answer must name. A lax route (the OpenAI one, as
    OpenAI's) may coerce between scalars, so it gets only values no coercion turns into the right type."""
    schema_name = ROUTE_BODIES[route]
    base = (
        {"messages": [{"role": "user", "content": "q"}]}
        if route == "/v1/chat/completions"
        else {"prompt": "q"}
    )
    for name, prop in doc["components"]["schemas"][schema_name]["properties"].items():
        allowed = allowed_types(prop)
        for kind, value in WRONG_VALUES.items():
            if kind in allowed or (kind == "null" and "default" in prop and name != "messages"):
                continue
            if not strict and not ({kind, *allowed} & {"array", "object"}):
                continue
            yield name, {**base, name: value}
        for value in out_of_bounds(prop):
            yield name, {**base, name: value}


def error_field(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        error = response.json()["error"]
        return str(error.get("field") or error.get("param") or "") or None
    return None


def bad_inputs(url: str, api_key: str | None) -> dict[str, Any]:
    tally = Tally()
    with client(url, api_key) as http:
        doc = http.get("/openapi.json").json()
        for route, strict in (
            ("/v1/jobs", True),
            ("/v1/chat/completions", False),
            ("/v1/completions", False),
        ):
            for name, body in bad_bodies(doc, route, strict):
                r = http.post(route, json=body)
                named = error_field(r)
                if r.status_code < 400:
                    bad = "accepted"
                    if route == "/v1/jobs":
                        http.delete(f"/v1/jobs/{r.json()['id']}")
                elif named is None or not (named == name or named.startswith(f"{name}.")):
                    bad = f"names {named!r}, not {name!r}"
                else:
                    bad = None
                tally.count(r.status_code, bad, f"{route} {name}={str(body[name])[:40]}")
        json_type = {"content-type": "application/json"}
        for raw in (b"{not json", b"[1, 2]", b"", b'"text"', b'{"prompt": "hi \\ud800"}', b"\xff\xfe"):
            for route in ROUTE_BODIES:
                r = http.post(route, content=raw, headers=json_type)
                bad = None if r.status_code >= 400 and error_field(r) else "no field named"
                tally.count(r.status_code, bad, f"{route} raw {raw[:20]!r}")
        leaked = leaked_pages(http)
    return {**asdict(tally), "leaked_pages": leaked}


# ---- fuzzing -------------------------------------------------------------------------------------------


def fuzz(url: str, api_key: str | None, cases: int, seed: int = 0) -> dict[str, Any]:
    """schemathesis cases, split evenly over operations and over valid/invalid generation."""
    import hypothesis
    import hypothesis.errors
    import schemathesis
    from schemathesis.core.result import Ok

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    if len(operations) < len(results):
        raise RuntimeError(f"schemathesis cannot read every operation: {results}")
    modes = list(schemathesis.GenerationMode)
    per_strategy = max(1, cases // (len(operations) * len(modes)))
    tally = Tally()
    timeouts = 0

    def send(case: Any, label: str) -> None:
        nonlocal timeouts
        try:
            response = case.call(base_url=url, headers=headers, timeout=(5, 5))
        except Exception as exc:  # requests' ReadTimeout and ConnectionError alike
            if "timed out" not in str(exc).lower():
                raise
            timeouts += 1
            return
        tally.count(response.status_code, None, f"{label} {str(case.body)[:200]}")

    settings = hypothesis.settings(
        max_examples=per_strategy,
        database=None,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.generate],
    )
    for operation in operations:
        for mode in modes:
            label = f"{operation.label} ({mode.value})"
            strategy = operation.as_strategy(generation_mode=mode)
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):  # nothing invalid to send
                settings(hypothesis.given(case=strategy)(sender(send, label)))()
    with client(url, api_key) as http:
        cancel_everything(http)
        leaked = leaked_pages(http)
    return {**asdict(tally), "operations": len(operations), "hung_up": timeouts, "leaked_pages": leaked}


def sender(send: Callable[[Any, str], None], label: str) -> Callable[[Any], None]:
    """A one-argument test for ``hypothesis.given``, which refuses a lambda with a default."""
    return lambda case: send(case, label)


# ---- churn, hang-ups, /health under load ---------------------------------------------------------------


@dataclass
class Churn:
    jobs: int = 0
    server_errors: int = 0
    gaps: int = 0
    duplicates: int = 0
    wrong_end: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(what)


def checked_events(hog: HogwildClient, job_id: str, churn: Churn, lock: threading.Lock) -> list[int]:
    """The whole stream's ids, read to done; a gap or repeat is counted."""
    ids = [e.id for e in hog.events(job_id, last_event_id=None) if e.id is not None]
    with lock:
        if len(set(ids)) != len(ids):
            churn.duplicates += 1
            churn.note(f"{job_id}: repeated ids")
        if ids != list(range(ids[0], ids[0] + len(ids))) if ids else True:
            churn.gaps += 1
            churn.note(f"{job_id}: ids {ids[:5]}... not contiguous")
    return ids


def one_job(url: str, api_key: str | None, way: str, churn: Churn, lock: threading.Lock) -> None:
    """One job, ended ``way``; what it saw is tallied in ``churn``."""
    rng = random.Random(f"{way}{time.monotonic_ns()}")
    body: dict[str, Any] = {
        "prompt": f"{rng.randrange(10**6)}: {PROMPT}",
        "max_tokens": rng.choice((8, 32, 200)),
    }
    try:
        with client(url, api_key, timeout=WAIT_S) as http, HogwildClient(url, api_key) as hog:
            if way == "hangup":
                with http.stream("POST", "/v1/jobs", json={**body, "stream": True}) as r:
                    job_id = r.headers.get("x-job-id", "")
                    next(r.iter_lines(), None)
                expect: tuple[str, ...] = ("cancelled", "finished")
            else:
                job_id = hog.submit(**body)["id"]
                expect = ("finished",)
                if way == "delete":
                    time.sleep(rng.uniform(0, 0.3))
                    hog.cancel(job_id)
                    expect = ("cancelled", "finished")
                elif way == "reconnect":
                    stream = hog.events(job_id)
                    seen = list(itertools.islice(stream, rng.randrange(1, 20)))
                    stream.close()  # the connection drops mid-stream
                    resumed = [] if seen[-1].type == "done" else hog.events(job_id, seen[-1].id)
                    ids = [e.id for e in [*seen, *resumed] if e.id is not None]
                    with lock:
                        if ids != list(range(ids[0], ids[0] + len(ids))):
                            churn.gaps += 1
                            churn.note(f"{job_id}: resumed ids not contiguous")
                checked_events(hog, job_id, churn, lock)
            status = wait_ended(http, job_id)
            with lock:
                churn.jobs += 1
                if status not in expect:
                    churn.wrong_end += 1
                    churn.note(f"{job_id} ({way}): {status}")
    except HogwildError as exc:
        with lock:
            churn.jobs += 1
            if exc.status >= 500 or exc.status == 0:
                churn.server_errors += 1
            churn.note(f"{way}: {exc}")


def wait_ended(http: httpx.Client, job_id: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status = str(http.get(f"/v1/jobs/{job_id}").json()["status"])
        if status in ENDED:
            return status
        time.sleep(0.02)
    return "never ended"


@contextlib.contextmanager
def health_poller(url: str) -> Iterator[list[float]]:
    """/health latencies (s), polled every 50 ms while the block runs."""
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            while not stop.is_set():
                start = time.perf_counter()
                http.get("/health")
                latencies.append(time.perf_counter() - start)
                stop.wait(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def churn(url: str, api_key: str | None, jobs: int, concurrency: int) -> dict[str, Any]:
    tally, lock = Churn(), threading.Lock()
    ways = ["done", "hangup", "delete", "reconnect"]
    start = time.monotonic()
    with health_poller(url) as health, ThreadPoolExecutor(concurrency) as pool:
        for i in range(jobs):
            pool.submit(one_job, url, api_key, ways[i % len(ways)], tally, lock)
    seconds = time.monotonic() - start
    with client(url, api_key) as http:
        leaked = leaked_pages(http)
    return {
        **asdict(tally),
        "seconds": seconds,
        "leaked_pages": leaked,
        "health_polls": len(health),
        "health_p50_ms": 1000 * (percentile(health, 0.5) or 0),
        "health_p99_ms": 1000 * (percentile(health, 0.99) or 0),
    }


def hangup(url: str, api_key: str | None, hangups: int, load: int) -> dict[str, Any]:
    """Disconnect -> cancelled while ``load`` other jobs run (polled every 20 ms over HTTP)."""
    times: list[float] = []
    statuses: list[str] = []
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 1000, "quick_check_every": 0}
    with client(url, api_key, timeout=WAIT_S) as http, HogwildClient(url, api_key) as hog:
        others = [hog.submit(**body)["id"] for _ in range(load)]
        for _ in range(hangups):
            with http.stream("POST", "/v1/jobs", json={**body, "stream": True}) as r:
                job_id = r.headers["x-job-id"]
                for line in r.iter_lines():
                    if line.startswith("event: token"):
                        break
                hung_up = time.monotonic()
            statuses.append(wait_ended(http, job_id))
            times.append(time.monotonic() - hung_up)
        for job_id in others:
            hog.cancel(job_id)
        leaked = leaked_pages(http)
    return {
        "hangups": hangups,
        "not_cancelled": sum(status != "cancelled" for status in statuses),
        "load_jobs": load,
        "cancelled_after_s_median": statistics.median(times),
        "cancelled_after_s_max": max(times),
        "leaked_pages": leaked,
    }


# ---- a stopped and a killed engine ---------------------------------------------------------------------


def time_until(check: Callable[[], bool], limit: float = WAIT_S) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def engine_faults(server: ServerProcess, api_key: str | None) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with client(server.url, api_key, timeout=10) as http:

        def ready(status: int) -> Callable[[], bool]:
            return lambda: http.get("/ready").status_code == status

        with HogwildClient(server.url, api_key) as hog:
            job_id = hog.submit(PROMPT, max_tokens=1000, quick_check_every=0)["id"]
        time_until(lambda: http.get(f"/v1/jobs/{job_id}").json()["workers"][0]["generated"] > 0)
        engine = server.engine_pid()
        os.kill(engine, signal.SIGSTOP)
        try:
            figures["sigstop_to_503_s"] = time_until(ready(503))
            start = time.monotonic()
            refused = http.post("/v1/jobs", json={"prompt": "q"})
            figures["post_while_stopped"] = refused.status_code
            figures["post_while_stopped_s"] = time.monotonic() - start
        finally:
            os.kill(engine, signal.SIGCONT)
        figures["sigcont_to_200_s"] = time_until(ready(200))
        http.delete(f"/v1/jobs/{job_id}")
        os.kill(server.engine_pid(), signal.SIGKILL)
        figures["kill9_to_503_s"] = time_until(ready(503))
        figures["kill9_to_ready_s"] = time_until(ready(200))
        figures["leaked_pages"] = leaked_pages(http)
    return figures


# ---- a soak --------------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss / 2**20)


def soak(server: ServerProcess, api_key: str | None, seconds: float, concurrency: int) -> dict[str, Any]:
    """Churn rounds until ``seconds`` are up; RSS (MB) of the server and the engine after each round, so a
    leak shows as a slope and a warm-up as a step that levels off."""
    rss = [(rss_mb(server.process.pid), rss_mb(server.engine_pid()))]
    rounds: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rounds.append(churn(server.url, api_key, 4 * concurrency, concurrency))
        rss.append((rss_mb(server.process.pid), rss_mb(server.engine_pid())))
    return {
        "seconds": seconds,
        "jobs": sum(r["jobs"] for r in rounds),
        "server_errors": sum(r["server_errors"] for r in rounds),
        "gaps": sum(r["gaps"] + r["duplicates"] for r in rounds),
        "leaked_pages": rounds[-1]["leaked_pages"] if rounds else 0,
        "health_p99_ms": max((r["health_p99_ms"] for r in rounds), default=0),
        "server_rss_mb": [round(server_mb) for server_mb, _ in rss],
        "engine_rss_mb": [round(engine_mb) for _, engine_mb in rss],
    }


# ---- the command ---------------------------------------------------------------------------------------

PARTS = ("bad", "fuzz", "churn", "hangup", "engine", "soak")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="a running server (default: start one on --model)")
    p.add_argument("--api-key", default=os.environ.get("HOGWILD_API_KEY"))
    p.add_argument("--model", help="the model of the server it starts (default: the embedded one)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=["bad", "fuzz", "churn", "hangup", "engine"])
    p.add_argument("--fuzz-cases", type=int, default=600)
    p.add_argument("--churn-jobs", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--hangups", type=int, default=5)
    p.add_argument("--soak-s", type=float, default=600.0)
    p.add_argument("--server-flag", action="append", default=[], help="a flag for the server it starts")
    common.add_output_arguments(p)


def run_parts(
    url: str, api_key: str | None, args: argparse.Namespace, server: ServerProcess | None
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for part in args.parts:
        common.log(f"reliability: {part}")
        if part == "bad":
            figures[part] = bad_inputs(url, api_key)
        elif part == "fuzz":
            figures[part] = fuzz(url, api_key, args.fuzz_cases)
        elif part == "churn":
            figures[part] = churn(url, api_key, args.churn_jobs, args.concurrency)
        elif part == "hangup":
            figures[part] = hangup(url, api_key, args.hangups, args.concurrency)
        elif server is None:
            figures[part] = {"skipped": "needs a server this benchmark started (no --url)"}
        elif part == "engine":
            figures[part] = engine_faults(server, api_key)
        else:
            figures[part] = soak(server, api_key, args.soak_s, args.concurrency)
        common.log(f"reliability: {part}: {figures[part]}")
    return figures


def main(args: argparse.Namespace) -> int:
    if args.url:
        figures = run_parts(args.url, args.api_key, args, None)
    else:
        from engine.loader import default_model_dir

        model = Path(args.model) if args.model else default_model_dir()
        log_dir = common.output_path(args, "reliability").parent
        log_dir.mkdir(parents=True, exist_ok=True)
        with running_server(model, log_dir, *args.server_flag, api_key=args.api_key) as server:
            figures = run_parts(server.url, args.api_key, args, server)
    rows = [
        [
            part,
            ", ".join(
                f"{k} {common.fmt(v, 2) if isinstance(v, float) else v}"
                for k, v in f.items()
                if k != "examples"
            ),
        ]
        for part, f in figures.items()
    ]
    common.print_table("Reliability", ["part", "figures"], rows)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    common.write_result(
        common.output_path(args, "reliability"), torch.device("cpu"), config, __doc__ or "", figures
    )
    failures = sum(f.get("server_errors", 0) + f.get("leaked_pages", 0) for f in figures.values())
    return 1 if failures else 0
