"""``python -m engine.serve``: the engine as its own process, looping without waiting on anyone.

It owns the model, the pool and the scheduler. Between two decode steps it reads whatever commands have
arrived (without blocking while there is work), then sends each front end one message with all the
events of its jobs for that step. A front end that goes away has its jobs cancelled, so their pages
come back. The listening socket is loopback unless told otherwise; a spawning server instead hands over
one end of a socket pair (``--fd``). Listening elsewhere takes a shared secret (``--secret-file``): each
front end must answer a random challenge with its HMAC before it is served (or ``--insecure``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hmac
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine import protocol
from engine.engine import DTYPES, Engine, Submission
from engine.errors import InvalidRequest, PromptTooLong, QueueFullError
from engine.loader import DEFAULT_NAME
from engine.protocol import EngineOptions, flag_help, parse_address, parse_bool

log = logging.getLogger("hogwild.engine")

IDLE_WAIT_S = 0.5  # how long an idle engine sleeps in select before checking for shutdown
AUTH_TIMEOUT_S = 10.0  # a front end that has not answered the challenge by then is dropped
AUTH_BYTES = 4096  # ... or that sends more than this before it has (an answer takes about 60)
TOKENIZE_POLL_S = 0.002  # how often an otherwise idle engine looks for a tokenized submission
# While it has work, the engine logs what it is doing this often (as vLLM does): an operator reading the
# log sees load and speed without a metrics stack.
LOG_EVERY_S = float(os.environ.get("HOGWILD_LOG_EVERY_S", "10"))


@dataclasses.dataclass(eq=False)  # hashed by identity: one per socket
class Connection:
    sock: socket.socket
    unpacker: Any = dataclasses.field(default_factory=protocol.unpacker)
    jobs: set[str] = dataclasses.field(default_factory=set)
    peer: str = "the server"
    nonce: bytes = b""  # the challenge it must answer; empty once it has (or when none was asked)
    deadline: float = 0.0  # ... by then
    unanswered_bytes: int = 0  # what it sent before answering


@dataclasses.dataclass
class Tokenizing:
    """A submission whose prompt is being tokenized; its reply waits for that."""

    conn: Connection
    req: Any
    job_id: str | None
    request: Submission
    future: Future[list[int]]


def refusal(exc: Exception) -> dict[str, Any]:
    """The reply to a refused submission: its code, message and field."""
    if isinstance(exc, QueueFullError):
        return {"ok": False, "code": protocol.QUEUE_FULL, "error": str(exc)}
    code = protocol.TOO_LONG if isinstance(exc, PromptTooLong) else protocol.INVALID
    return {"ok": False, "code": code, "error": str(exc), "field": getattr(exc, "field", None)}


class EngineService:
    def __init__(
        self,
        engine: Engine,
        info: dict[str, Any],
        exit_when_alone: bool = False,
        secret: bytes | None = None,
    ):
        self.engine = engine
        self.info = info
        self.secret = secret  # front ends that connect must prove they hold it
        self.exit_when_alone = exit_when_alone  # spawned for one front end: end with it
        self.selector = selectors.DefaultSelector()
        self.connections: dict[socket.socket, Connection] = {}
        self.owner: dict[str, Connection] = {}
        self.stopping = False
        self.lost: str | None = None  # why the engine had to stop (a tensor-parallel rank is gone)
        self.step_times: deque[float] = deque(maxlen=100)
        # Prompts are tokenized on a thread of their own, with a tokenizer of their own.
        self.tokenizer = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.tokenizer_copy = copy.deepcopy(engine.tokenizer)
        self.tokenizing: list[Tokenizing] = []
        self.logged_at = time.monotonic()
        self.tokens_since_log = 0

    # -- sockets ------------------------------------------------------------------------------------

    def listen(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ, self._accept)

    def adopt(self, sock: socket.socket, peer: str | None = None) -> None:
        """A front end connects: greet it with what it needs to know before submitting, or first with a
        challenge when it came through the listening socket and the engine has a secret."""
        sock.setblocking(True)
        conn = Connection(sock)
        self.connections[sock] = conn
        self.selector.register(sock, selectors.EVENT_READ, self._read)
        if peer is not None and self.secret is not None:
            conn.peer, conn.nonce, conn.deadline = peer, os.urandom(32), time.monotonic() + AUTH_TIMEOUT_S
            self._send(conn, {"type": "challenge", "nonce": conn.nonce})
        else:
            self._greet(conn)

    def _greet(self, conn: Connection) -> None:
        self._send(conn, {"type": "ready", "info": self.info, "load": self.load()})

    def _accept(self, sock: socket.socket) -> None:
        client, address = sock.accept()
        self.adopt(client, peer=str(address or "a Unix socket"))

    def _authenticate(self, conn: Connection, message: Any) -> None:
        """The first message of a challenged front end: the HMAC of the nonce under the shared secret."""
        assert self.secret is not None
        answer = message.get("hmac") if isinstance(message, dict) and message.get("type") == "auth" else None
        if isinstance(answer, bytes) and hmac.compare_digest(
            answer, protocol.secret_answer(self.secret, conn.nonce)
        ):
            conn.nonce = b""
            log.info("a front end from %s is authenticated", conn.peer)
            self._greet(conn)
            return
        self._refuse(conn, "a wrong secret" if answer is not None else "no answer to the challenge")

    def _refuse(self, conn: Connection, why: str) -> None:
        log.error("refused a front end from %s: %s", conn.peer, why)
        error = f"{why} (a front end must hold the engine's --secret-file)"
        self._send(conn, {"type": "refused", "error": error})
        self._drop(conn)

    def _expire_challenges(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.connections.values() if c.nonce and now > c.deadline]:
            self._refuse(conn, f"no answer to the challenge within {AUTH_TIMEOUT_S:.0f} s")

    def _read(self, sock: socket.socket) -> None:
        conn = self.connections[sock]
        try:
            data = sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            if conn.nonce:
                log.error(
                    "refused a front end from %s: it hung up without answering the challenge", conn.peer
                )
            self._drop(conn)
            return
        if conn.nonce:
            conn.unanswered_bytes += len(data)
            if conn.unanswered_bytes > AUTH_BYTES:
                self._refuse(conn, f"over {AUTH_BYTES} bytes sent before answering the challenge")
                return
        try:
            conn.unpacker.feed(data)
            for message in conn.unpacker:
                if conn.sock not in self.connections:  # dropped while answering an earlier message
                    return
                if conn.nonce:
                    self._authenticate(conn, message)
                else:
                    self._handle(conn, message)
        except Exception as exc:  # undecodable bytes: this front end is cut off, the others go on
            log.warning("dropping a front end that sent a bad message: %s", exc)
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        """The front end went away: nobody will read its jobs' events, so cancel them and free pages."""
        if self.connections.get(conn.sock) is not conn:  # already dropped
            return
        for job_id in conn.jobs:
            self.engine.cancel(job_id)
            self.owner.pop(job_id, None)
        self.selector.unregister(conn.sock)
        del self.connections[conn.sock]
        conn.sock.close()
        if self.exit_when_alone and not self.connections:
            self.stopping = True

    def _send(self, conn: Connection, message: dict[str, Any]) -> None:
        try:
            conn.sock.sendall(protocol.pack(message))
        except OSError:
            self._drop(conn)

    # -- commands -----------------------------------------------------------------------------------

    def _handle(self, conn: Connection, message: Any) -> None:
        """Answer one command. A command that fails in any way gets an error reply: the front end and its
        other jobs go on."""
        if not isinstance(message, dict):
            message = {"type": repr(message)[:40]}
        req = message.get("req")
        try:
            reply = self._answer(conn, message)
        except Exception as exc:
            log.warning("refused a bad %r command: %s", message.get("type"), exc)
            reply = {"ok": False, "code": protocol.INVALID, "error": f"{type(exc).__name__}: {exc}"}
        if reply is not None:  # None: a submission being tokenized, answered when it is
            self._send(conn, {"type": "reply", "req": req, **reply})

    def _answer(self, conn: Connection, message: dict[str, Any]) -> dict[str, Any] | None:
        kind = message.get("type")
        reply: dict[str, Any] = {"ok": True}
        if kind == "submit":
            refused = self._submit(conn, message)
            if refused is None:
                return None
            reply.update(refused)
        elif kind == "cancel":
            reply["result"] = self.engine.cancel(str(message.get("job_id")))
        elif kind == "stats":
            reply["result"] = self.stats()
        elif kind == "shutdown":
            self.stopping = True
            reply["result"] = True
        elif (
            kind == "release"
        ):  # the front end leaves: its jobs end now (their done first), the engine runs on
            for job_id in list(conn.jobs):
                self.engine.cancel(job_id)
            self._deliver(self.engine.take_outbox())
            reply["result"] = True
        else:
            reply.update(ok=False, code=protocol.INVALID, error=f"unknown command {kind!r}")
        return reply

    def _submit(self, conn: Connection, message: dict[str, Any]) -> dict[str, Any] | None:
        """Check a submission here, tokenize it on the tokenizer's thread (a long prompt must not hold up
        every job's step), queue it when that is done (``_enqueue``). The refusal, if any."""
        if self.stopping:
            return {"ok": False, "code": protocol.SHUTTING_DOWN, "error": "the engine is shutting down"}
        params = dict(message.get("params") or {})
        prompt = params.pop("prompt", None)
        try:
            request = self.engine.check(prompt, **params)
        except (InvalidRequest, QueueFullError) as exc:
            return refusal(exc)
        future = self.tokenizer.submit(self.engine.tokenize, request, self.tokenizer_copy)
        self.tokenizing.append(Tokenizing(conn, message.get("req"), message.get("job_id"), request, future))
        return None

    def _enqueue(self) -> None:
        """Queue the submissions whose prompts are tokenized, and answer them."""
        for item in [t for t in self.tokenizing if t.future.done()]:
            self.tokenizing.remove(item)
            conn = item.conn
            if self.connections.get(conn.sock) is not conn:  # the front end went away meanwhile
                continue
            try:
                job = self.engine.enqueue(item.request, item.future.result(), item.job_id)
            except (InvalidRequest, QueueFullError) as exc:
                self._send(conn, {"type": "reply", "req": item.req, **refusal(exc)})
                continue
            except Exception as exc:
                log.warning("refused a bad submission: %s", exc)
                error = {"ok": False, "code": protocol.INVALID, "error": f"{type(exc).__name__}: {exc}"}
                self._send(conn, {"type": "reply", "req": item.req, **error})
                continue
            conn.jobs.add(job.id)
            self.owner[job.id] = conn
            result = {
                "job_id": job.id,
                "prompt_tokens": len(job.prompt_ids),
                "workers": [w.name for w in job.workers],
                "options": job.resolved_options,
                "load": self.load(),
            }
            self._send(conn, {"type": "reply", "req": item.req, "ok": True, "result": result})

    def load(self) -> dict[str, int]:
        """What a server with several engines routes by: sent with every events message and reply."""
        engine = self.engine
        return {"running": len(engine.running), "queued": len(engine.queue), "free_pages": engine.free_pages}

    def stats(self) -> dict[str, Any]:
        stats = self.engine.stats()
        times = self.step_times
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        stats["steps_per_second"] = (len(times) - 1) / span if span > 0 else 0.0
        return stats

    # -- the loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            busy = self.engine.has_work
            wait = 0 if busy else TOKENIZE_POLL_S if self.tokenizing else IDLE_WAIT_S
            for key, _ in self.selector.select(wait):
                key.data(key.fileobj)
            self.lost = self.engine.lost()
            if self.lost:  # a tensor-parallel rank is gone: this engine ends, and its server starts another
                log.error("stopping: %s", self.lost)
                self.stopping = True
            if self.stopping:
                self._deliver(self.engine.cancel_all())
                break
            if self.secret is not None:
                self._expire_challenges()
            self._enqueue()
            if self.engine.outbox:  # a cancel's done goes out now, not after the next forward pass
                self._deliver(self.engine.take_outbox())
            if self.engine.has_work:
                self._step()
        for conn in list(self.connections.values()):
            conn.sock.close()
        self.selector.close()
        self.tokenizer.shutdown(wait=False, cancel_futures=True)

    def _step(self) -> None:
        start = time.monotonic()
        try:
            events = self.engine.step()
        except Exception as exc:  # the batch failed: its jobs end with an error, the engine goes on
            log.exception("decode step failed")
            events = self.engine.fail_running(f"engine step failed: {type(exc).__name__}: {exc}")
        now = time.monotonic()
        self.step_times.append(now)
        self.tokens_since_log += sum(ev.type == "token" and not ev.data["forced"] for ev in events)
        self._deliver(events, now - start)
        if now - self.logged_at >= LOG_EVERY_S:
            self._log_load(now)

    def _log_load(self, now: float) -> None:
        stats = self.engine.stats()
        log.info(
            "%d running, %d queued, %.1f generated tokens/s, KV pages %.0f%% used, prefix cache %.0f%% hit",
            stats["running"],
            stats["queued"],
            self.tokens_since_log / (now - self.logged_at),
            100 * stats["used_pages"] / max(1, stats["total_pages"]),
            100 * stats["prefix_cache_hit_rate"],
        )
        self.logged_at, self.tokens_since_log = now, 0

    def _deliver(self, events: list[Any], step_s: float = 0.0) -> None:
        by_conn: dict[Connection, list[dict[str, Any]]] = {}
        for ev in events:
            conn = self.owner.get(ev.job_id)
            if conn is None:
                continue
            by_conn.setdefault(conn, []).append(ev.to_dict())
            if ev.type == "done":
                del self.owner[ev.job_id]
                conn.jobs.discard(ev.job_id)
        if not by_conn:
            return
        load, step = self.load(), self.engine.steps
        for conn, batch in by_conn.items():
            self._send(
                conn, {"type": "events", "step": step, "step_s": step_s, "events": batch, "load": load}
            )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the model and every EngineOptions field, with their help and defaults."""
    parser.add_argument("--model", default=None, help=flag_help(protocol.MODEL_HELP, None))
    parser.add_argument("--device", default="cpu", help=flag_help(protocol.DEVICE_HELP, "cpu"))
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help=flag_help(protocol.DTYPE_HELP, None)
    )
    kinds: dict[str, Callable[[str], Any]] = {"str": str, "str | None": str, "bool": parse_bool}
    for f in dataclasses.fields(EngineOptions):
        kind = kinds.get(str(f.type), int)  # annotations are strings here (PEP 563)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=None,
            metavar={parse_bool: "true|false", int: "N"}.get(kind),
            help=flag_help(f.metadata.get("help"), f.default),
        )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineOptions flags that were given, as keywords."""
    names = (f.name for f in dataclasses.fields(EngineOptions))
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def model_name(model: str | None) -> str:
    """What /v1/models calls it: the hub id, or a local folder's or file's own name."""
    if model is None:
        return DEFAULT_NAME
    path = Path(model)
    return path.stem if path.exists() else model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__)
    add_engine_arguments(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--address",
        default="127.0.0.1:7071",
        help=flag_help("host:port or a Unix socket path to listen on", "127.0.0.1:7071"),
    )
    where.add_argument(
        "--fd", type=int, default=None, help=flag_help("an inherited connected socket (spawned)", None)
    )
    parser.add_argument(
        "--secret-file",
        default=None,
        help=flag_help("a shared secret: front ends must prove they hold it (HMAC)", None),
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help=flag_help("listen beyond loopback without a secret (a trusted network)", False),
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    secret = None
    if args.secret_file is not None:
        try:
            secret = protocol.read_secret(args.secret_file)
        except (OSError, ValueError) as exc:
            log.error("cannot read the secret: %s", exc)
            return protocol.BAD_SETUP
    elif args.fd is None and not args.insecure and not protocol.is_loopback(args.address):
        log.error(
            "refusing to listen on %s without a secret: anyone who reaches it could run jobs. Give "
            "--secret-file PATH (and the server --engine-secret-file PATH), or --insecure on a trusted "
            "network",
            args.address,
        )
        return protocol.BAD_SETUP
    try:
        engine = Engine.from_pretrained(
            args.model, device=args.device, dtype=args.dtype, **engine_options(args)
        )
    except (OSError, ValueError) as exc:  # a path or hub id that does not resolve, a model it cannot serve
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error("cannot serve the model %s: %s", args.model or DEFAULT_NAME, message)
        return protocol.BAD_SETUP
    info = {
        "model": model_name(args.model),
        "max_workers": engine.options.max_workers,
        "max_tokens": engine.options.max_tokens,
        "max_positions": engine.shape.max_positions,
        "created": int(time.time()),  # when the model was loaded: /v1/models' created
        "total_pages": engine.total_pages,
        "page_size": engine.options.page_size,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "tensor_parallel": engine.options.tensor_parallel,
    }
    service = EngineService(engine, info, exit_when_alone=args.fd is not None, secret=secret)
    stopped_by: list[int] = []

    def stop(sig: int, frame: Any) -> None:
        stopped_by.append(sig)
        service.stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # a spawned engine ignores SIGINT: its server's
            signal.signal(sig, stop)
    if args.fd is not None:
        service.adopt(socket.socket(fileno=args.fd))
    else:
        family, addr = parse_address(args.address)
        listener = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(addr)
        listener.listen()
        service.listen(listener)
        log.info("listening on %s%s", args.address, " (front ends must hold the secret)" if secret else "")
    service.run()
    engine.close()
    if service.lost:
        return 1  # a failure after a good start: the server starts the engine again
    return 130 if signal.SIGINT in stopped_by else 0  # Ctrl-C's status, as a shell's


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while the model loads: a status, not a traceback
        sys.exit(130)
