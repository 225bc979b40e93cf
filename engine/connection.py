"""The front end's handle on an engine process, for asyncio: commands with replies, events by callback.

The server either spawns the engine (one end of a socket pair is handed to the child, so no port is
opened and the child ends with the server) or connects to a standalone one, answering its challenge with
the shared secret when it asks for one. When the engine dies the
socket reaches end of file at once, every waiting command fails with ``EngineUnavailable`` and
``on_exit`` tells the server, which fails its open jobs: a dead engine is known within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from engine import protocol
from engine.protocol import parse_address

EventsCallback = Callable[[dict[str, Any]], None]  # gets each "events" message whole
ExitCallback = Callable[[str], None]
PR_SET_PDEATHSIG = 1  # linux/prctl.h
SIG_IGN = 1  # signal.h


class EngineUnavailable(RuntimeError):
    """The engine process is gone (or never came up); ``status`` is its exit status where it exited."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class EngineAuthFailed(EngineUnavailable):
    """The engine refused this front end's secret (or asked for one it does not have): retrying as such will
    not help."""


class EngineRefused(Exception):
    """The engine refused a command; ``code`` is one of protocol's reply codes."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code, self.message, self.field = code, message, field


def die_with_parent() -> Callable[[], None]:
    """What the spawned engine runs before it execs. It ignores SIGINT: Ctrl-C in a terminal signals the
    whole foreground process group, the engine too, and the server drains its engine itself (ignored
    before the exec, SIGINT stays ignored while the engine imports torch and loads its model). And on
    Linux the kernel kills it when its server dies, however the server goes (a busy port, a signal during
    start-up, kill -9); otherwise an engine still loading its model keeps loading, and holds the GPU, with
    nobody to serve. Elsewhere the engine ends when it finds its socket closed. libc is looked up here, in
    the parent: the child of a threaded process should call nothing that may take a lock."""
    libc, parent = ctypes.CDLL(None), os.getpid()
    prctl = libc.prctl if sys.platform.startswith("linux") else None
    ignore = libc.signal  # not signal.signal: that one refuses a thread other than the main one
    ignore.argtypes, ignore.restype = (ctypes.c_int, ctypes.c_void_p), ctypes.c_void_p

    def in_child() -> None:
        ignore(signal.SIGINT, SIG_IGN)
        if prctl is not None:
            bind_to_parent(parent, prctl)

    return in_child


def bind_to_parent(parent: int, prctl: Callable[..., int] | None = None) -> None:
    """In a child: the kernel kills it when ``parent`` dies (Linux; elsewhere nothing). ``prctl`` looked up
    beforehand where the child may not take locks (between fork and exec)."""
    if prctl is None:
        if not sys.platform.startswith("linux"):
            return
        prctl = ctypes.CDLL(None).prctl
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the prctl: nobody would signal
        os._exit(1)


class EngineClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_events: EventsCallback,
        on_exit: ExitCallback,
        process: asyncio.subprocess.Process | None = None,
        secret: bytes | None = None,
        address: str = "the spawned engine",
    ):
        self.reader, self.writer, self.process = reader, writer, process
        self.on_events, self.on_exit = on_events, on_exit
        self.secret, self.address = secret, address
        self.challenged = False  # the engine asked for the secret
        self.info: dict[str, Any] = {}
        # The engine's running, queued and free_pages as of its last events message or reply.
        self.load: dict[str, int] = {}
        self.dead: str | None = None
        self.timeout: float | None = None  # how long a command may wait for its reply
        self.last_heard = time.monotonic()  # when the engine last sent anything
        self.status: int | None = None  # the process's exit status, once it has exited
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._numbers = itertools.count()
        self._task = asyncio.create_task(self._read_loop())

    # -- starting -----------------------------------------------------------------------------------

    @classmethod
    async def spawn(
        cls,
        args: list[str],
        on_events: EventsCallback,
        on_exit: ExitCallback,
        ready_timeout: float,
        env: dict[str, str] | None = None,
    ) -> EngineClient:
        """Start ``python -m engine.serve`` with ``args`` (in ``env``, else this process's environment) and
        wait until its model is loaded."""
        ours, theirs = socket.socketpair()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine.serve",
            "--fd",
            str(theirs.fileno()),
            *args,
            pass_fds=(theirs.fileno(),),
            preexec_fn=die_with_parent(),
            env=env,
        )
        theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        client = cls(reader, writer, on_events, on_exit, process)
        await client.wait_ready(ready_timeout)
        return client

    @classmethod
    async def connect(
        cls,
        address: str,
        on_events: EventsCallback,
        on_exit: ExitCallback,
        ready_timeout: float = 10.0,
        secret: bytes | None = None,
    ) -> EngineClient:
        """Connect to a standalone ``python -m engine.serve --address ...`` (holding its ``secret``)."""
        family, addr = parse_address(address)
        try:
            if family == socket.AF_UNIX:
                reader, writer = await asyncio.open_unix_connection(addr)
            else:
                reader, writer = await asyncio.open_connection(*addr)
        except OSError as exc:
            raise EngineUnavailable(f"cannot reach the engine at {address}: {exc}") from exc
        client = cls(reader, writer, on_events, on_exit, secret=secret, address=f"the engine at {address}")
        await client.wait_ready(ready_timeout)
        return client

    async def wait_ready(self, timeout: float) -> None:
        try:
            self.info = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError as exc:
            await self.close()
            raise EngineUnavailable(f"the engine was not ready within {timeout:.0f} s") from exc
        except EngineAuthFailed:
            self.writer.close()
            raise

    # -- commands -----------------------------------------------------------------------------------

    async def request(self, kind: str, **fields: Any) -> Any:
        if self.dead is not None:
            raise EngineUnavailable(self.dead)
        req = next(self._numbers)
        try:
            message = protocol.pack({"type": kind, "req": req, **fields})
        except (OverflowError, TypeError, ValueError) as exc:  # e.g. an integer msgpack cannot hold
            raise EngineRefused(protocol.INVALID, f"cannot send the request: {exc}") from exc
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        self.writer.write(message)
        try:
            await self.writer.drain()
            return await asyncio.wait_for(future, self.timeout)
        except OSError as exc:
            raise EngineUnavailable(f"the engine connection broke: {exc}") from exc
        except asyncio.TimeoutError:
            raise EngineUnavailable(f"the engine did not answer within {self.timeout:.0f} s") from None
        finally:
            self._pending.pop(req, None)

    @property
    def waiting(self) -> bool:
        """Whether a command waits for its reply."""
        return bool(self._pending)

    def kill(self) -> None:
        """End a spawned engine that no longer answers; a standalone one is not ours to end."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()

    async def submit(self, job_id: str, params: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("submit", job_id=job_id, params=params)
        return result

    async def cancel(self, job_id: str) -> bool:
        return bool(await self.request("cancel", job_id=job_id))

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("stats")
        return result

    async def close(self, timeout: float = 10.0) -> None:
        """Ask for a graceful shutdown (open jobs end with done events), then make sure it is gone."""
        if self.dead is None:
            with contextlib.suppress(EngineUnavailable, OSError):
                await asyncio.wait_for(self.request("shutdown"), timeout)
        process = self.process
        if process is not None and process.returncode is None:
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout)
        self.writer.close()

    async def release(self, timeout: float = 10.0) -> None:
        """Leave a standalone engine, which may serve others and outlives this front end: this front end's
        jobs end now (their done events arrive first), then the connection closes; the engine runs on."""
        if self.dead is None:
            with contextlib.suppress(EngineUnavailable, EngineRefused, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.request("release"), timeout)
        self.writer.close()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout)

    # -- the reader ---------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        unpacker = protocol.unpacker()
        reason = "the engine closed the connection"
        try:
            while chunk := await self.reader.read(1 << 20):
                self.last_heard = time.monotonic()
                unpacker.feed(chunk)
                for message in unpacker:
                    self._dispatch(message)
        except Exception as exc:  # a broken stream ends this client like a dead engine does
            reason = f"the engine connection failed: {type(exc).__name__}: {exc}"
        self._died(await self._exit_reason(reason))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "events":
            self.load = message.get("load") or self.load
            self.on_events(message)
        elif kind == "reply":
            future = self._pending.pop(message["req"], None)
            if future is None or future.done():
                return
            if message["ok"]:
                result = message.get("result")
                if isinstance(result, dict) and "load" in result:
                    self.load = result["load"]
                future.set_result(result)
            else:
                future.set_exception(EngineRefused(message["code"], message["error"], message.get("field")))
        elif kind == "ready" and not self._ready.done():
            self.load = message.get("load") or {}
            self._ready.set_result(message["info"])
        elif kind == "challenge" and not self._ready.done():
            self._answer(message.get("nonce"))
        elif kind == "refused" and not self._ready.done():
            error = f"{self.address} refused this server: {message.get('error')}"
            self._ready.set_exception(EngineAuthFailed(error))

    def _answer(self, nonce: Any) -> None:
        """Prove to the engine that this front end holds the shared secret."""
        self.challenged = True
        if self.secret is None:
            error = f"{self.address} asks for a secret: give the server --engine-secret-file"
            self._ready.set_exception(EngineAuthFailed(error))
        elif isinstance(nonce, bytes):
            answer = protocol.secret_answer(self.secret, nonce)
            self.writer.write(protocol.pack({"type": "auth", "hmac": answer}))

    async def _exit_reason(self, reason: str) -> str:
        process = self.process
        if process is None:
            return reason
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), 0.5)
        code = self.status = process.returncode
        if code is None:
            return reason
        if code < 0:
            return f"the engine process was killed by {signal.Signals(-code).name}"
        return f"the engine process exited with status {code}"

    def _died(self, reason: str) -> None:
        self.dead = reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(EngineUnavailable(reason))
        self._pending.clear()
        if not self._ready.done():
            self._ready.set_exception(EngineUnavailable(reason, self.status))
        self.on_exit(reason)
