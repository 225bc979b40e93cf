"""The engine as its own process, driven through the same asyncio client the server uses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from engine import protocol
from engine.connection import EngineClient, EngineRefused, EngineUnavailable

READY_S = 120.0  # a hang guard for process start-up, not a speed requirement


def run(scenario: Coroutine[Any, Any, None]) -> None:
    """asyncio.run in a thread of its own: Playwright's sync API leaves a running loop in the main thread
    once the dashboard tests have run."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, scenario).result()


class Recorder:
    """Collects the events the engine sends, by job, and notes when the engine goes away."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.ended: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.exit = asyncio.Event()
        self.exit_reason = ""
        self.messages: list[dict[str, Any]] = []

    def on_events(self, message: dict[str, Any]) -> None:
        assert message["step_s"] >= 0
        self.messages.append(message)
        for ev in message["events"]:
            self.events[ev["job_id"]].append(ev)
            if ev["type"] == "done":
                self.ended[ev["job_id"]].set()

    def on_exit(self, reason: str) -> None:
        self.exit_reason = reason
        self.exit.set()


async def spawn(model_dir: Path, *args: str) -> tuple[EngineClient, Recorder]:
    rec = Recorder()
    client = await EngineClient.spawn(
        ["--model", str(model_dir), *args], rec.on_events, rec.on_exit, ready_timeout=READY_S
    )
    return client, rec


def assert_gap_free(events: list[dict[str, Any]]) -> None:
    assert [ev["seq"] for ev in events] == list(range(len(events)))
    assert events[-1]["type"] == "done"
    assert sum(ev["type"] == "done" for ev in events) == 1


def test_fifty_jobs_with_random_cancels_all_end_and_the_pool_refills(tiny_model_dir: Path) -> None:
    async def scenario() -> None:
        client, rec = await spawn(tiny_model_dir, "--max-queued-jobs", "64", "--max-running-jobs", "16")
        rng = random.Random(7)
        jobs = [f"job-{i}" for i in range(50)]

        async def submit(job_id: str) -> None:
            params = {
                "prompt": f"Problem {job_id}: add the numbers 1 to {rng.randint(3, 30)}.",
                "workers": rng.randint(1, 3),
                "max_tokens": rng.randint(4, 24),
                "temperature": rng.choice([0.0, 0.8]),
                "seed": rng.randint(0, 100),
            }
            await client.submit(job_id, params)

        await asyncio.gather(*(submit(j) for j in jobs))
        cancelled = rng.sample(jobs, 15)
        for job_id in cancelled:
            await asyncio.sleep(rng.random() * 0.05)
            await client.cancel(job_id)
        await asyncio.wait_for(asyncio.gather(*(rec.ended[j].wait() for j in jobs)), 300)
        for job_id in jobs:
            events = rec.events[job_id]
            assert_gap_free(events)
            reason = events[-1]["data"]["finish_reason"]
            assert reason in ("answer", "stop", "length", "cancelled")
        assert any(rec.events[j][-1]["data"]["finish_reason"] == "cancelled" for j in cancelled)
        stats = await client.stats()
        assert stats["running"] == stats["queued"] == 0
        assert stats["free_pages"] == stats["total_pages"]
        assert stats["used_pages"] == 0
        # The jobs share the instructions' pages; what they cached stays, idle and evictable.
        assert stats["prefix_cache_hits"] > 0 and stats["evictable_pages"] > 0
        assert stats["free_pages"] == stats["total_pages"]
        assert stats["steps"] > 0
        await client.close()
        assert client.process is not None and client.process.returncode == 0

    run(scenario())


def test_a_full_queue_refuses_at_once_with_its_reason(tiny_model_dir: Path) -> None:
    async def scenario() -> None:
        client, _ = await spawn(tiny_model_dir, "--max-queued-jobs", "2", "--max-running-jobs", "1")
        long_job = {"prompt": "Count to a million.", "workers": 2, "max_tokens": 1000, "quick_check_every": 0}
        for i in range(3):  # one runs, two wait (whatever the timing, at most three fit)
            try:
                await client.submit(f"j{i}", long_job)
            except EngineRefused as exc:
                assert exc.code == protocol.QUEUE_FULL
        with pytest.raises(EngineRefused, match="queue is full") as refused:
            await client.submit("j3", long_job)
        assert refused.value.code == protocol.QUEUE_FULL
        await client.close()

    run(scenario())


def test_invalid_submissions_name_the_field(tiny_model_dir: Path) -> None:
    async def scenario() -> None:
        client, _ = await spawn(tiny_model_dir, "--max-workers", "4")
        cases: list[tuple[dict[str, Any], str, str]] = [
            ({"prompt": "q", "workers": 9}, protocol.INVALID, "workers"),
            ({"prompt": "q", "layout": "spiral"}, protocol.INVALID, "layout"),
            ({"prompt": "q", "top_p": 2.0}, protocol.INVALID, "top_p"),
            ({"prompt": "q " * 3000, "workers": 4, "max_tokens": 500}, protocol.TOO_LONG, "prompt"),
            ({"prompt": "q", "colour": "red"}, protocol.INVALID, "colour"),  # an unknown option
        ]
        for params, code, field in cases:
            with pytest.raises(EngineRefused) as refused:
                await client.submit("bad", params)
            assert (refused.value.code, refused.value.field) == (code, field)
        stats = await client.stats()
        assert stats["queued"] == stats["running"] == 0
        await client.close()

    run(scenario())


def test_kill_9_is_detected_and_open_requests_fail(tiny_model_dir: Path) -> None:
    async def scenario() -> None:
        client, rec = await spawn(tiny_model_dir)
        await client.submit("long", {"prompt": "Think for a long time.", "max_tokens": 1000})
        assert client.process is not None
        os.kill(client.process.pid, signal.SIGKILL)
        await asyncio.wait_for(rec.exit.wait(), 30)
        assert "SIGKILL" in rec.exit_reason
        with pytest.raises(EngineUnavailable, match="SIGKILL"):
            await client.stats()
        await client.close()

    run(scenario())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def abuse(address: str) -> None:
    """Bad commands on a raw socket, each answered with an error; then a flood, and a hang-up mid-reply."""
    host, port = address.rsplit(":", 1)
    bad: list[Any] = [
        [1, 2, 3],
        {"type": "submit", "req": 1, "params": "abc"},
        {"type": "submit", "req": 2, "params": {"prompt": [{"role": "user"}]}},
        {"type": "submit", "req": 3, "params": {"prompt": "q", "logit_bias": {"x": 1}}},
        {"type": "submit", "req": 4, "params": {"prompt": "q", "top_k": 1.5}},
        {"type": "submit", "req": 5, "params": {"prompt": "q", "temperature": float("nan")}},
        {"type": "launch", "req": 6},
    ]
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"".join(protocol.pack(m) for m in bad))
        unpacker, replies = protocol.unpacker(), list[dict[str, Any]]()
        while len(replies) < len(bad) and (data := sock.recv(1 << 16)):  # b"": the engine hung up
            unpacker.feed(data)
            replies += [m for m in unpacker if m["type"] == "reply"]
        assert [r["ok"] for r in replies] == [False] * len(bad)
        assert {r["code"] for r in replies} == {protocol.INVALID}
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"".join(protocol.pack({"type": "stats", "req": i}) for i in range(20_000)))


def test_standalone_engine_over_loopback_tcp(tiny_model_dir: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.serve", "--model", str(tiny_model_dir), "--address", address]
    )

    async def scenario() -> None:
        rec = Recorder()
        for _ in range(int(READY_S * 10)):  # the process listens once its model is loaded
            try:
                client = await EngineClient.connect(address, rec.on_events, rec.on_exit)
                break
            except EngineUnavailable:
                await asyncio.sleep(0.1)
        assert client.info["max_workers"] >= 2
        abuse(address)  # a misbehaving front end gets error replies and cannot take the engine down
        await client.submit("tcp-job", {"prompt": "What is 2 + 2?", "workers": 2, "max_tokens": 8})
        await asyncio.wait_for(rec.ended["tcp-job"].wait(), 120)
        events = rec.events["tcp-job"]
        assert_gap_free(events)
        assert {ev["data"]["worker"] for ev in events if ev["type"] == "token"} == {0, 1}
        await client.close()
        await asyncio.wait_for(rec.exit.wait(), 30)

    try:
        run(scenario())
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


SERVER_WITHOUT_TORCH = """
import sys, time
from starlette.testclient import TestClient
from server.app import create_app
from server.settings import Settings

app = create_app(Settings(engine_address=sys.argv[1]))
with TestClient(app) as http:
    while http.get("/ready").status_code != 200:
        time.sleep(0.1)
    job = http.post("/v1/jobs", json={"prompt": "What is 2 + 2?", "workers": 2, "max_tokens": 4}).json()
    while http.get("/v1/jobs/" + job["id"]).json()["status"] != "finished":
        time.sleep(0.1)
print(" ".join(m for m in ("torch", "transformers", "engine.engine", "engine.job") if m in sys.modules))
"""


def test_the_server_runs_jobs_without_importing_torch(tiny_model_dir: Path) -> None:
    """The HTTP process holds only the contract (engine.protocol, engine.connection): its memory and start-up
    carry none of the model's libraries."""
    address = f"127.0.0.1:{free_port()}"
    engine = subprocess.Popen(
        [sys.executable, "-m", "engine.serve", "--model", str(tiny_model_dir), "--address", address]
    )
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOGWILD_")}
        host, port = address.split(":")
        for _ in range(int(READY_S * 10)):  # the engine listens once its model is loaded
            with contextlib.suppress(OSError), socket.create_connection((host, int(port))):
                break
            time.sleep(0.1)
        server = subprocess.run(
            [sys.executable, "-c", SERVER_WITHOUT_TORCH, address],
            capture_output=True,
            text=True,
            timeout=READY_S,
            env=env,
        )
        assert server.returncode == 0, server.stderr[-3000:]
        assert server.stdout.strip() == ""  # none of them was imported
    finally:
        engine.kill()
        engine.wait()


def test_a_cancelled_jobs_done_is_sent_before_the_next_forward_pass(tiny_model_dir: Path) -> None:
    """It used to wait for the next step, which others' long steps make long: the done came with the next
    step's tokens of the other jobs."""

    async def scenario() -> None:
        client, rec = await spawn(tiny_model_dir)
        long_job = {"prompt": "Count to a million.", "workers": 2, "max_tokens": 1000, "quick_check_every": 0}
        for job_id in ("cancelled", "running"):
            await client.submit(job_id, long_job)
        while not all(any(e["type"] == "token" for e in rec.events[j]) for j in ("cancelled", "running")):
            await asyncio.sleep(0.01)
        assert await client.cancel("cancelled")
        await asyncio.wait_for(rec.ended["cancelled"].wait(), 30)
        carrier = next(m for m in rec.messages if any(e["type"] == "done" for e in m["events"]))
        assert {e["job_id"] for e in carrier["events"]} == {"cancelled"}, carrier["events"][:3]
        assert carrier["step_s"] == 0  # no forward pass came first
        await client.cancel("running")
        await client.close()

    run(scenario())


def test_a_huge_prompt_is_tokenized_while_the_other_jobs_step(tiny_model_dir: Path) -> None:
    """Tokenizing a 900 KB prompt took the engine loop for a third of a second before its 413: no job
    stepped meanwhile, and its reply came before any more of the running job's events. Now it is tokenized
    on a thread of its own and the running job's steps go on before the reply, in the order the wire
    carries them."""
    ours, theirs = socket.socketpair()
    cmd = [sys.executable, "-m", "engine.serve", "--fd", str(theirs.fileno()), "--model", str(tiny_model_dir)]
    engine = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),))
    theirs.close()
    unpacker = protocol.unpacker()

    def receive() -> Iterator[dict[str, Any]]:
        while data := ours.recv(1 << 16):
            unpacker.feed(data)
            yield from unpacker

    messages = receive()
    try:
        assert next(messages)["type"] == "ready"
        job = {"prompt": "Count.", "workers": 1, "max_tokens": 2000, "quick_check_every": 0}
        ours.sendall(protocol.pack({"type": "submit", "req": 1, "job_id": "running", "params": job}))
        while next(messages)["type"] != "events":  # the running job steps
            pass
        huge = {"prompt": "word " * 180_000, "workers": 2}
        ours.sendall(protocol.pack({"type": "submit", "req": 2, "job_id": "huge", "params": huge}))
        steps_before_reply = 0
        for message in messages:
            if message["type"] == "reply" and message["req"] == 2:
                break
            steps_before_reply += message["type"] == "events"
        assert message["code"] == protocol.TOO_LONG
        # 162 steps here; inline tokenizing let only the backlog already on the wire through (8).
        assert steps_before_reply >= 40, steps_before_reply
        ours.sendall(protocol.pack({"type": "shutdown", "req": 3}))
        assert engine.wait(timeout=READY_S) == 0
    finally:
        engine.kill()
        ours.close()
