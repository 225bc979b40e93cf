"""The engine process lives and dies with its server: no engine outlives it, however it ends; a server
pointed at a standalone engine that is not up yet keeps trying, and says so."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.server_process import free_port, running_server

WAIT_S = 120.0  # a hang guard, never a speed requirement


def processes_marked(mark: str) -> list[int]:
    """Live processes whose environment holds ``ORPHAN_CHECK=mark``: the server and what it spawned."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"ORPHAN_CHECK={mark}".encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def wait_gone(mark: str) -> list[int]:
    deadline = time.monotonic() + 30
    while (left := processes_marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def mark(monkeypatch: pytest.MonkeyPatch) -> str:
    value = uuid.uuid4().hex
    monkeypatch.setenv("ORPHAN_CHECK", value)
    return value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_busy_port_stops_the_server_and_its_engine(tiny_model_dir: Path, tmp_path: Path, mark: str) -> None:
    """The engine was spawned before uvicorn found its port taken, and went on loading the model."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "server", "--port", str(port), "--model", str(tiny_model_dir)]
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT_S
        while server.poll() is None and not [p for p in processes_marked(mark) if p != server.pid]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        output = server.communicate(timeout=WAIT_S)[0].decode()
    assert server.returncode != 0 and "address already in use" in output.lower(), output[-2000:]
    assert wait_gone(mark) == [], output[-2000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_engine_busy_loading_dies_with_its_killed_server(
    tiny_model_dir: Path, tmp_path: Path, mark: str
) -> None:
    """An engine reads its socket, and so ends with its server, only once its model is loaded: one held
    up (SIGSTOP stands for a 70B model's minutes of loading) outlived a kill -9 of the server for good."""
    with running_server(tiny_model_dir, tmp_path) as server:
        engine = server.engine_pid()
        os.kill(engine, signal.SIGSTOP)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=WAIT_S)
        left = wait_gone(mark)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert left == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_while_the_engine_starts_leaves_no_engine(tiny_model_dir: Path, mark: str) -> None:
    cmd = [sys.executable, "-m", "server", "--port", str(free_port()), "--model", str(tiny_model_dir)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + WAIT_S
    while len(processes_marked(mark)) < 2:  # the engine is spawned, its model not loaded yet
        assert time.monotonic() < deadline and server.poll() is None
        time.sleep(0.02)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=WAIT_S)
    assert wait_gone(mark) == []


def test_a_server_waits_for_a_standalone_engine_that_is_not_up_yet(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """It used to give up at once and stay 503 until restarted; now it retries with back-off."""
    address = f"127.0.0.1:{free_port()}"
    with running_server(tiny_model_dir, tmp_path, "--engine-address", address, wait_ready=False) as server:
        deadline = time.monotonic() + WAIT_S
        while "waiting for the engine" not in (reason := httpx.get(f"{server.url}/ready").text):
            assert time.monotonic() < deadline, reason
            time.sleep(0.1)
        assert address in reason
        engine = subprocess.Popen(
            [sys.executable, "-m", "engine.serve", "--model", str(tiny_model_dir), "--address", address]
        )
        try:
            while httpx.get(f"{server.url}/ready").status_code != 200:
                assert time.monotonic() < deadline + WAIT_S and engine.poll() is None
                time.sleep(0.2)
            assert server.process.poll() is None
        finally:
            engine.terminate()
            engine.wait(timeout=WAIT_S)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("when", ["starting", "ready"])
def test_ctrl_c_drains_quietly_with_status_130(tiny_model_dir: Path, mark: str, when: str) -> None:
    """Ctrl-C signals the terminal's whole foreground process group: the server and the engine it
    spawned. It ended in tracebacks (the engine's KeyboardInterrupt while loading its model, uvicorn's
    cancelled lifespan); now the server drains its engine and exits 130, as a shell reports Ctrl-C."""
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--model", str(tiny_model_dir)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready").is_success
        except httpx.TransportError:
            return False

    deadline = time.monotonic() + WAIT_S
    # Starting: the engine is spawned and loading its model (it ignores Ctrl-C: the server drains it).
    while len(processes_marked(mark)) < 2 or (when == "ready" and not ready()):
        assert time.monotonic() < deadline and server.poll() is None
        time.sleep(0.05)
    os.killpg(server.pid, signal.SIGINT)  # as the terminal does: to the process group
    output = server.communicate(timeout=WAIT_S)[1].decode()
    assert server.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert wait_gone(mark) == [], output[-3000:]
