"""Several engines behind one server: jobs spread over them and stay on theirs, one engine's death ends only
its own jobs, and a standalone engine with a secret serves only the servers that hold it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import protocol
from engine.connection import EngineClient
from server.settings import Settings, parse_settings
from tests.server_process import ServerProcess, free_port, running_server
from tests.test_server import api, events_of, metric_values, sse, submit, wait_for

WAIT_S = 120.0  # a hang guard, never a speed requirement


@pytest.fixture(scope="module")
def two_engines(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tiny_model_dir, tmp_path_factory.mktemp("dp"), "--data-parallel", "2") as server:
        all_ready(server)  # /ready is 200 once the first is
        yield server


def engines(server: ServerProcess) -> list[dict[str, Any]]:
    return list(httpx.get(f"{server.url}/ready").json()["engines"])


def all_ready(server: ServerProcess) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        listed = engines(server)
        if all(e["state"] == "ready" for e in listed):
            return listed
        assert time.monotonic() < deadline, listed
        time.sleep(0.1)


def test_jobs_are_spread_over_both_engines_and_each_reports_its_own(two_engines: ServerProcess) -> None:
    before = engines(two_engines)
    assert [e["state"] for e in before] == ["ready", "ready"]
    assert len({e["pid"] for e in before}) == 2 and None not in {e["pid"] for e in before}
    with api(two_engines) as http:
        jobs = [submit(http, max_tokens=8, workers=2) for _ in range(4)]
        finished = [wait_for(http, job["id"], ("finished",)) for job in jobs]
        assert sorted(job["engine"] for job in finished) == [0, 0, 1, 1]  # each went to the idle one
        for job in finished:
            events = events_of(http, job["id"], last=2)  # a reconnect replays from its engine's record
            assert [int(e["id"]) for e in events] == list(range(3, 3 + len(events)))
        long = [submit(http, max_tokens=1000) for _ in range(2)]  # a cancel reaches the job's own engine
        assert {job["engine"] for job in long} == {0, 1}
        assert [http.delete(f"/v1/jobs/{job['id']}").json()["status"] for job in long] == ["cancelled"] * 2
        stats = http.get("/v1/stats").json()
    after = engines(two_engines)
    assert [e["jobs"] - b["jobs"] for b, e in zip(before, after, strict=True)] == [3, 3]
    per_engine = stats["engines"]
    assert [e["engine"] for e in per_engine] == [0, 1] and all(e["steps"] > 0 for e in per_engine)
    assert stats["steps"] == sum(e["steps"] for e in per_engine)
    assert stats["total_pages"] == sum(e["total_pages"] for e in per_engine)
    assert stats["free_pages"] == stats["total_pages"]  # every job ended: nothing held or reserved
    values = metric_values(two_engines)
    for engine in ("0", "1"):
        assert values[f'hogwild_engine_up{{engine="{engine}"}}'] == 1
        assert values[f'hogwild_pool_pages_total{{engine="{engine}"}}'] > 0
        assert values[f'hogwild_step_latency_seconds_count{{engine="{engine}"}}'] > 0
    health = httpx.get(f"{two_engines.url}/health").json()
    assert health["engines"] == [{"engine": 0, "state": "ready"}, {"engine": 1, "state": "ready"}]


def test_a_killed_engine_fails_only_its_jobs_and_comes_back(two_engines: ServerProcess) -> None:
    """kill -9 of one engine: its job ends with the error, the other engine's job runs on to its end with no
    gap in its events, /ready stays 200 meanwhile, and the dead engine is restarted."""
    with api(two_engines) as http:
        doomed = submit(http, max_tokens=1000, quick_check_every=0)
        survivor = submit(http, max_tokens=500, quick_check_every=0)
        assert {doomed["engine"], survivor["engine"]} == {0, 1}
        streams: dict[str, list[dict[str, Any]]] = {doomed["id"]: [], survivor["id"]: []}
        started = {job_id: threading.Event() for job_id in streams}

        def follow(job_id: str) -> None:
            with api(two_engines) as client, client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
                for event in sse(r):
                    streams[job_id].append(event)
                    started[job_id].set()

        readers = [threading.Thread(target=follow, args=(job_id,)) for job_id in streams]
        for reader in readers:
            reader.start()
        for event in started.values():
            assert event.wait(WAIT_S)
        assert http.get(f"/v1/jobs/{survivor['id']}").json()["status"] == "running"
        victim = engines(two_engines)[doomed["engine"]]
        before_kill = len(streams[survivor["id"]])
        os.kill(victim["pid"], signal.SIGKILL)
        for reader in readers:
            reader.join(WAIT_S)
        ready = httpx.get(f"{two_engines.url}/ready")  # the other engine still serves
        assert ready.status_code == 200
        assert ready.json()["engines"][doomed["engine"]]["state"] != "ready"
        lost, kept = streams[doomed["id"]], streams[survivor["id"]]
        assert [e["event"] for e in lost[-2:]] == ["error", "done"] and "SIGKILL" in lost[-2]["data"][
            "message"
        ]
        assert len(kept) > before_kill  # it ran on across the kill ...
        assert [int(e["id"]) for e in kept] == list(range(len(kept)))  # ... with no gap, no repeat
        assert kept[-1]["event"] == "done" and kept[-1]["data"]["finish_reason"] != "error"
        assert not any(e["event"] == "error" for e in kept)
        assert http.get(f"/v1/jobs/{survivor['id']}").json()["status"] == "finished"
        assert http.get(f"/v1/jobs/{doomed['id']}").json()["status"] == "failed"
        state = all_ready(two_engines)[doomed["engine"]]
        assert state["restarts"] == 1 and state["pid"] not in (None, victim["pid"])
        again = [submit(http, max_tokens=4) for _ in range(2)]
        assert {wait_for(http, job["id"], ("finished",))["engine"] for job in again} == {0, 1}


@pytest.fixture(scope="module")
def guarded_engine(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A standalone engine on a loopback port that asks for a secret."""
    folder = tmp_path_factory.mktemp("secret")
    secret, wrong = folder / "secret", folder / "wrong"
    secret.write_text("correct horse battery staple\n")
    wrong.write_text("incorrect horse battery staple\n")
    address, log = f"127.0.0.1:{free_port()}", folder / "engine.log"
    cmd = [sys.executable, "-m", "engine.serve", "--model", str(tiny_model_dir), "--address", address]
    with open(log, "wb") as out:
        engine = subprocess.Popen([*cmd, "--secret-file", str(secret)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + WAIT_S
    while "listening on" not in log.read_text():
        assert engine.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    yield {
        "address": address,
        "secret": secret,
        "wrong": wrong,
        "log": log,
        "folder": folder,
        "engine": engine,
    }
    engine.terminate()
    engine.wait(timeout=WAIT_S)


def wait_for_reason(server: ServerProcess, words: str) -> str:
    deadline = time.monotonic() + WAIT_S
    while words not in (reason := str(httpx.get(f"{server.url}/ready").json().get("reason"))):
        assert time.monotonic() < deadline and server.process.poll() is None, reason
        time.sleep(0.1)
    return reason


@pytest.mark.parametrize("given", ["wrong", None])
def test_an_engine_with_a_secret_refuses_a_server_without_it(
    guarded_engine: dict[str, Any], tiny_model_dir: Path, given: str | None
) -> None:
    address, log = guarded_engine["address"], guarded_engine["log"]
    flags = ["--engine-address", address]
    if given:
        flags += ["--engine-secret-file", str(guarded_engine[given])]
    refusals = log.read_text().count("refused a front end")
    with running_server(tiny_model_dir, guarded_engine["folder"], *flags, wait_ready=False) as server:
        if given:
            reason = wait_for_reason(server, "refused this server")
            assert address in reason and "wrong secret" in reason
        else:
            reason = wait_for_reason(server, "asks for a secret")
            assert "--engine-secret-file" in reason
        time.sleep(2)  # no retry storm: the next try waits for the longest back-off
        assert httpx.get(f"{server.url}/ready").status_code == 503
        assert (
            httpx.post(f"{server.url}/v1/jobs", json={"prompt": "q"}, headers=api(server).headers).status_code
            == 503
        )
    seen = log.read_text().count("refused a front end")
    assert seen - refusals == 1, log.read_text()[-2000:]


def test_an_engine_with_a_secret_serves_a_server_that_holds_it(
    guarded_engine: dict[str, Any], tiny_model_dir: Path
) -> None:
    flags = [
        "--engine-address",
        guarded_engine["address"],
        "--engine-secret-file",
        str(guarded_engine["secret"]),
    ]
    with running_server(tiny_model_dir, guarded_engine["folder"], *flags) as server, api(server) as http:
        job = wait_for(http, submit(http, max_tokens=4)["id"], ("finished",))
        assert job["usage"]["completion_tokens"] > 0
        [engine] = httpx.get(f"{server.url}/ready").json()["engines"]
        assert engine["address"] == guarded_engine["address"] and engine["pid"] is None
        running = submit(http, max_tokens=1000, quick_check_every=0)
        server.process.terminate()  # a graceful stop ends the server's own jobs on the engine ...
        assert server.process.wait(timeout=WAIT_S) == 0
    assert "is authenticated" in guarded_engine["log"].read_text()
    assert (
        guarded_engine["engine"].poll() is None
    )  # ... and leaves the engine, which may serve others, running
    secret = protocol.read_secret(str(guarded_engine["secret"]))

    async def ask() -> dict[str, Any]:
        client = await EngineClient.connect(guarded_engine["address"], print, print, WAIT_S, secret)
        try:
            return await client.stats()
        finally:
            await client.release()

    with ThreadPoolExecutor(1) as pool:  # a loop of its own (the dashboard tests leave one running)
        stats = pool.submit(asyncio.run, ask()).result()
    assert stats["running"] == stats["queued"] == 0, running
    assert stats["free_pages"] == stats["total_pages"]


def test_the_challenge_on_the_wire(guarded_engine: dict[str, Any]) -> None:
    """Only the HMAC of this connection's nonce under the secret opens it; anything else closes it with the
    reason, before any command is read."""

    def exchange(send: bytes) -> list[dict[str, Any]]:
        host, port = guarded_engine["address"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
            unpacker = protocol.unpacker()
            unpacker.feed(sock.recv(1 << 16))
            challenge = next(unpacker)
            assert challenge["type"] == "challenge" and len(challenge["nonce"]) == 32
            secret = protocol.read_secret(str(guarded_engine["secret"]))
            sock.sendall(
                send
                or protocol.pack({"type": "auth", "hmac": protocol.secret_answer(secret, challenge["nonce"])})
            )
            replies: list[dict[str, Any]] = []
            while not replies or replies[-1]["type"] not in ("ready", "refused"):
                unpacker.feed(sock.recv(1 << 16))
                replies += list(unpacker)
            return replies

    assert exchange(b"")[-1]["type"] == "ready"  # the right answer
    stats = protocol.pack({"type": "stats", "req": 0})
    assert "no answer to the challenge" in exchange(stats)[-1]["error"]
    wrong = protocol.pack({"type": "auth", "hmac": protocol.secret_answer(b"x" * 16, b"")})
    assert "a wrong secret" in exchange(wrong)[-1]["error"]
    assert "bytes sent before answering" in exchange(b"\xc1" * 5000)[-1]["error"]


def test_an_engine_will_not_listen_beyond_loopback_without_a_secret(tiny_model_dir: Path) -> None:
    cmd = [sys.executable, "-m", "engine.serve", "--model", str(tiny_model_dir), "--address", "0.0.0.0:1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 2 and "--secret-file" in done.stderr and "--insecure" in done.stderr


def test_each_spawned_engine_gets_gpus_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    def env(settings: Settings, index: int) -> dict[str, str]:
        found = settings.engine_env(index)
        assert found is not None
        return found

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    four = Settings(device="cuda", data_parallel=4)
    assert [env(four, i)["CUDA_VISIBLE_DEVICES"] for i in range(4)] == ["4", "5", "6", "7"]
    assert Settings(device="cuda").engine_env(0) is None  # one engine: the environment as it is
    with pytest.raises(ValueError, match="need 8 GPUs"):
        Settings(device="cuda", data_parallel=8).engine_env(0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = env(Settings(data_parallel=2), 1)["OMP_NUM_THREADS"]
    assert threads == str(max(1, (os.cpu_count() or 1) // 2))  # the cores shared out
    with pytest.raises(ValueError, match="not both"):
        Settings(data_parallel=2, engine_address="127.0.0.1:7071")


def test_engine_addresses_repeat_as_flags_and_join_with_commas_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    given = parse_settings(["--engine-address", "gpu1:7071", "--engine-address", "[::1]:7072"])
    assert given.engine_addresses == ["gpu1:7071", "[::1]:7072"]
    monkeypatch.setenv("HOGWILD_ENGINE_ADDRESS", "gpu1:7071, gpu2:7071")
    assert parse_settings([]).engine_addresses == ["gpu1:7071", "gpu2:7071"]
    with pytest.raises(SystemExit):  # spawned and standalone engines together: refused with a message
        parse_settings(["--data-parallel", "2"])
