"""``python -m server`` as a real process on a free loopback port, for the tests and benchmarks that speak
HTTP to it (and signal its engine)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

API_KEY = "test-key-0123456789"
READY_S = 180.0  # a hang guard for start-up (torch import, model load), not a speed requirement


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def engine_pid(self) -> int:
        """The engine process the server spawned (its only child)."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return int(out.stdout.split()[0])


@contextmanager
def running_server(
    model_dir: Path,
    log_dir: Path,
    *flags: str,
    api_key: str | None = API_KEY,
    wait_ready: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """Start the server (with ``env`` added to the environment), wait until /ready answers 200 (or only
    /health, without ``wait_ready``), and stop it (SIGTERM, then SIGKILL) afterwards."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    given = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOGWILD_") or k == "HOGWILD_CACHE"}
    env.update(given)
    if api_key:
        env["HOGWILD_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--model", str(model_dir), *flags], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + READY_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                probe = "/ready" if wait_ready else "/health"
                if httpx.get(f"{server.url}{probe}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {READY_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.25)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
