"""Load against a running server over HTTP (docs/API.md), in the manner of ``vllm bench serve``.

For each concurrency limit, ``--num-requests`` jobs are sent, at ``--request-rate`` per second (Poisson
arrivals; ``inf`` sends them all at once), with at most that many in flight. Each request is
``POST /v1/jobs`` with ``"stream": true`` (or, with ``--via events``, a plain POST and then
``GET /v1/jobs/{id}/events``), read as server-sent events, all on the client's clock:

- time to first token (TTFT): request sent -> first ``token`` event that the model generated (forced text
  such as openers and step headers does not count)
- inter-token latency (ITL): gaps between one worker's successive generated tokens, over all workers
- end-to-end latency (E2E): request sent -> ``done`` event
- output tokens/s: generated tokens of the successful requests / (last done - first request sent)
- cached share: prompt tokens the server read from its prefix cache / prompt tokens, over the successful
  requests (their ``usage.cached_tokens``)

Every request's prompt starts with its own number, so what requests share is what any server's jobs share:
the chat template and the instructions before the problem.

Jobs are greedy with no finisher and no quick check. The server decides EOS, so jobs may stop before
``max_tokens``; the tokens actually generated are counted.

With ``--data-parallel 1 2`` the benchmark starts the server itself (``python -m server --model M
--data-parallel N``), once per N, each engine with ``--threads-per-engine`` CPU threads
(``OMP_NUM_THREADS``), and runs the same load against each: the figures of one engine and of several on
one machine, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import common
from bench.server_process import running_server


@dataclass
class Request:
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Figure:
    concurrency: int
    request_rate: float | None  # None: all at once
    requests: int
    failed: int
    seconds: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    cached_share: float
    errors: list[str]
    data_parallel: int | None = None  # engines of the server the benchmark started (--data-parallel)


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_output_arguments(p)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--api-key", default=os.environ.get("HOGWILD_API_KEY"), help="default: $HOGWILD_API_KEY")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4], help="requests in flight at most")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf: at once")
    p.add_argument("--num-requests", type=int, default=8, help="requests per concurrency level")
    p.add_argument("--workers", type=int, default=2, help="workers per job")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per worker")
    p.add_argument("--prompt-chars", type=int, default=1000, help="characters of text in each prompt")
    p.add_argument("--via", choices=("stream", "events"), default="stream", help="POST stream or GET events")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for GET /ready")
    p.add_argument("--seed", type=int, default=0, help="seeds the arrival times")
    p.add_argument(
        "--data-parallel",
        type=int,
        nargs="+",
        help="start a server per value with that many engines (instead of --url) and load each alike",
    )
    p.add_argument("--model", help="the model of the servers it starts (default: the embedded one)")
    p.add_argument("--threads-per-engine", type=int, default=1, help="OMP_NUM_THREADS of each engine")
    p.add_argument("--server-flag", action="append", default=[], help="a flag for the servers it starts")


async def sse(response: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a text/event-stream response; comments and ids are skipped."""
    event, data = "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


async def consume(response: Any, start: float, result: Request) -> None:
    """Fill ``result`` from a job's event stream until ``done``."""
    last: dict[int, float] = {}
    async for event, data in sse(response):
        t = time.perf_counter()
        if event == "token" and not data.get("forced"):
            result.output_tokens += 1
            if result.ttft_s is None:
                result.ttft_s = t - start
            worker = int(data.get("worker", 0))
            if worker in last:
                result.itl_s.append(t - last[worker])
            last[worker] = t
        elif event == "error":
            result.error = str(data.get("message", data))
        elif event == "done":
            result.e2e_s = t - start
            result.finish_reason = data.get("finish_reason")
            usage = data.get("usage") or {}
            result.prompt_tokens = usage.get("prompt_tokens")
            result.cached_tokens = int(usage.get("cached_tokens") or 0)
            result.ok = result.error is None and result.finish_reason != "error"
            return
    result.error = result.error or "the stream ended without a done event"


async def one_request(http: Any, body: dict[str, Any], via: str) -> Request:
    result = Request()
    start = time.perf_counter()
    try:
        if via == "stream":
            async with http.stream("POST", "/v1/jobs", json={**body, "stream": True}) as response:
                if response.status_code >= 300:
                    result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                    return result
                await consume(response, start, result)
        else:
            created = await http.post("/v1/jobs", json=body)
            if created.status_code >= 300:
                result.error = f"HTTP {created.status_code}: {created.text[:200]}"
                return result
            async with http.stream("GET", f"/v1/jobs/{created.json()['id']}/events") as response:
                await consume(response, start, result)
    except Exception as exc:  # a failed request is a data point of a load test, not the end of it
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def wait_ready(http: Any, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while True:
        try:
            if (await http.get("/ready")).status_code == 200:
                return
        except Exception:  # not listening yet
            pass
        if time.perf_counter() > deadline:
            raise SystemExit(f"the server at {http.base_url} was not ready within {timeout:.0f} s")
        await asyncio.sleep(0.5)


def client(args: argparse.Namespace, connections: int = 4) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=connections)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    return httpx.AsyncClient(base_url=args.url, headers=headers, timeout=timeout, limits=limits)


async def server_model(args: argparse.Namespace) -> str | None:
    """The served model's id from ``GET /v1/models``, once the server is ready."""
    async with client(args) as http:
        await wait_ready(http, args.ready_timeout)
        listing = await http.get("/v1/models")
        data = listing.json().get("data") if listing.status_code == 200 else None
        return str(data[0]["id"]) if data else None


async def load(args: argparse.Namespace, body: dict[str, Any], concurrency: int, engines: int = 1) -> Figure:
    async with client(args, concurrency + 4) as http:
        warm = {
            **body,
            "max_tokens": 2,
        }  # one warm-up per engine at once (each goes to an idle one), not counted
        await asyncio.gather(*(one_request(http, warm, args.via) for _ in range(engines)))
        gate = asyncio.Semaphore(concurrency)
        arrivals = random.Random(args.seed)

        async def gated(k: int) -> Request:
            async with gate:
                return await one_request(http, {**body, "prompt": f"Request {k}. {body['prompt']}"}, args.via)

        start = time.perf_counter()
        tasks = []
        for k in range(args.num_requests):
            tasks.append(asyncio.create_task(gated(concurrency * args.num_requests + k)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(arrivals.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
    good = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in good)
    return Figure(
        concurrency=concurrency,
        request_rate=args.request_rate if math.isfinite(args.request_rate) else None,
        requests=len(results),
        failed=len(results) - len(good),
        seconds=seconds,
        requests_per_s=len(good) / seconds,
        output_tokens=tokens,
        output_tokens_per_s=tokens / seconds,
        ttft_ms=common.summary([1000 * r.ttft_s for r in good if r.ttft_s is not None]),
        itl_ms=common.summary([1000 * gap for r in good for gap in r.itl_s]),
        e2e_ms=common.summary([1000 * r.e2e_s for r in good]),
        cached_share=sum(r.cached_tokens for r in good) / max(1, sum(r.prompt_tokens or 0 for r in good)),
        errors=sorted({r.error for r in results if r.error}),
    )


def plot(figures: list[Figure], path: Any) -> None:
    def draw(axes: Any) -> None:
        rate, latency = axes
        for engines in dict.fromkeys(f.data_parallel for f in figures):  # one line per server, in order
            group = [f for f in figures if f.data_parallel == engines]
            tag = f"{engines} engine(s): " if engines else ""
            c = [f.concurrency for f in group]
            rate.plot(c, [f.output_tokens_per_s for f in group], "o-", label=tag or None)
            for name in ("ttft_ms", "itl_ms", "e2e_ms"):
                for key, style in (("p50", "o-"), ("p99", "s--")):
                    values = [getattr(f, name)[key] for f in group]
                    latency.plot(c, values, style, label=f"{tag}{name[:-3]} {key}")
        latency.set_yscale("log")
        latency.set_ylabel("ms")
        for ax in axes:
            ax.set_xlabel("concurrent requests")

    common.save_plot(draw, path, panels=2)


def levels(args: argparse.Namespace, body: dict[str, Any], engines: int | None) -> list[Figure]:
    """The load at each concurrency level against the server at ``args.url``."""
    figures = []
    for c in args.concurrency:
        figure = asyncio.run(load(args, body, c, engines or 1))
        figure.data_parallel = engines
        figures.append(figure)
        where = f"{engines} engine(s), " if engines else ""
        common.log(f"{where}concurrency {c}: {figure.output_tokens_per_s:.1f} output tok/s")
        for error in figure.errors:
            common.log(f"  error: {error}")
    return figures


@contextmanager
def started_server(args: argparse.Namespace, engines: int) -> Iterator[str]:
    """``python -m server`` with ``engines`` engines of ``--threads-per-engine`` threads each; its URL."""
    from engine.loader import default_model_dir

    model = Path(args.model) if args.model else default_model_dir()
    log_dir = common.output_path(args, "serve").parent
    log_dir.mkdir(parents=True, exist_ok=True)
    flags = ["--data-parallel", str(engines), *args.server_flag]
    env = {"OMP_NUM_THREADS": str(args.threads_per_engine)}
    with running_server(model, log_dir, *flags, api_key=args.api_key, env=env) as server:
        import httpx

        deadline = time.monotonic() + args.ready_timeout  # /ready is 200 once the first engine is
        while time.monotonic() < deadline:
            if all(e["state"] == "ready" for e in httpx.get(f"{server.url}/ready").json()["engines"]):
                break
            time.sleep(0.25)
        yield server.url


def main(args: argparse.Namespace) -> int:
    body = {
        "prompt": common.make_prompt(args.prompt_chars),
        "workers": args.workers,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
        "finisher": False,
        "quick_check_every": 0,
    }
    figures: list[Figure] = []
    if args.data_parallel:
        for engines in args.data_parallel:
            with started_server(args, engines) as url:
                args.url = url
                model = asyncio.run(server_model(args))
                figures += levels(args, body, engines)
    else:
        model = asyncio.run(server_model(args))
        figures = levels(args, body, None)
    where = f"servers started on {model}" if args.data_parallel else f"{args.url} ({model})"
    dp = ["engines"] if args.data_parallel else []
    common.print_table(
        f"{where}: {args.num_requests} requests per level, {args.workers} workers, "
        f"{args.max_tokens} max tokens/worker, rate {args.request_rate}/s",
        [
            *dp,
            "concurrency",
            "ok/sent",
            "req/s",
            "out tok/s",
            "TTFT ms mean/p50/p99",
            "ITL ms",
            "E2E ms",
            "cached",
        ],
        [
            [
                *([str(f.data_parallel)] if dp else []),
                str(f.concurrency),
                f"{f.requests - f.failed}/{f.requests}",
                common.fmt(f.requests_per_s, 2),
                common.fmt(f.output_tokens_per_s),
                common.fmt_summary(f.ttft_ms, 0),
                common.fmt_summary(f.itl_ms, 0),
                common.fmt_summary(f.e2e_ms, 0),
                f"{100 * f.cached_share:.0f}%",
            ]
            for f in figures
        ],
    )
    config = {
        "url": args.url,
        "model": model,
        "via": args.via,
        "body": {k: v for k, v in body.items() if k != "prompt"},
        "prompt_chars": len(str(body["prompt"])),
        "num_requests": args.num_requests,
        "concurrency": args.concurrency,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "data_parallel": args.data_parallel,
        "threads_per_engine": args.threads_per_engine if args.data_parallel else None,
    }
    path = common.output_path(args, "serve")
    # The figures are the client's; the machine record is the client's too (the server may be elsewhere).
    common.write_result(path, torch.device("cpu"), config, __doc__ or "", [asdict(f) for f in figures])
    if args.plot:
        plot(figures, path)
    return 0 if all(f.failed < f.requests for f in figures) else 1
