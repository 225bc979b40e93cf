"""The contract between the engine process and its front ends: the engine's options, the messages of the
wire, where an engine listens, and the workers' names. It imports neither torch nor the rest of the engine,
so the HTTP server (and any other front end) loads without the model's libraries.

The wire is a stream of msgpack maps over one socket.

msgpack frames itself, so a streaming ``Unpacker`` needs no length prefix, and it decodes only plain data
(maps, lists, strings, numbers): nothing that arrives can run code, unlike pickle.

Front end to engine, each with a request number ``req`` that the reply carries back:
  ``{"type": "submit", "req", "job_id", "params": {...Engine.submit keywords}}``
  ``{"type": "cancel", "req", "job_id"}``, ``{"type": "stats", "req"}``, ``{"type": "shutdown", "req"}``,
  ``{"type": "release", "req"}`` (cancel this front end's jobs, before it hangs up on an engine it shares)
Engine to front end:
  ``{"type": "ready", "info": {...}}`` once the model is loaded, first on every connection;
  ``{"type": "reply", "req", "ok", "result" | "error", "code", "field"}``;
  ``{"type": "events", "step", "step_s", "events": [...], "load": {...}}``: one message per decode step
  with every event of that connection's jobs (Event.to_dict()), how long the step took, and the engine's
  load after it (``running``, ``queued``, ``free_pages``; also in ``ready`` and a submission's reply), by
  which a server with several engines routes its next job without asking.

An engine listening with a secret first sends ``{"type": "challenge", "nonce": bytes}``; the front end
answers ``{"type": "auth", "hmac": HMAC-SHA256(secret, nonce)}`` and gets ``ready``, or
``{"type": "refused", "error"}`` and the connection closes.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import math
import socket
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from engine.errors import InvalidRequest

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
BAD_SETUP = 2  # the exit status of an engine that cannot load its model: no restart will help

# Reply codes for refused requests; the server maps them to HTTP statuses.
INVALID, TOO_LONG, QUEUE_FULL, NOT_FOUND, SHUTTING_DOWN = (
    "invalid",
    "too_long",
    "queue_full",
    "not_found",
    "shutting_down",
)


# The help of the flags that choose the model, shared by the engine's and the server's command lines.
MODEL_HELP = "hub id, local folder or .gguf file; unset: the embedded SmolLM2-135M-Instruct"
DEVICE_HELP = "where the model runs: cpu, cuda, cuda:1, ..."
DTYPE_HELP = (
    "float32, bfloat16 or float16; unset: bfloat16 on CUDA and on CPUs with native bfloat16 (avx512_bf16, "
    "AMX), else float32"
)


@dataclass
class EngineOptions:
    """How an engine is set up: flags of ``python -m engine.serve`` and of the server, keywords of
    ``Engine``."""

    page_size: int = field(default=16, metadata={"help": "tokens per KV page"})
    num_pages: int | None = field(
        default=None, metadata={"help": "KV pages in the pool; unset: kv_tokens worth"}
    )
    kv_tokens: int | None = field(
        default=None, metadata={"help": "tokens of KV cache; unset: 32768 on CPU, 90% of free memory on CUDA"}
    )
    attention: str = field(
        default="auto",
        metadata={
            "help": "reference, vectorized, cpu or triton; auto: triton on CUDA when it runs, the C++ cpu "
            "kernel on CPUs that build it, else vectorized"
        },
    )
    prefill_chunk: int = field(
        default=512, metadata={"help": "prompt tokens prefilled per step, over all jobs"}
    )
    max_workers: int = field(default=16, metadata={"help": "most workers a job may ask for"})
    max_tokens: int = field(default=32768, metadata={"help": "most tokens a job may ask for, per worker"})
    max_running_jobs: int = field(default=64, metadata={"help": "jobs decoded together"})
    max_queued_jobs: int = field(
        default=256, metadata={"help": "jobs waiting to run; more are refused (HTTP 429)"}
    )
    cpu_kernels: bool = field(
        default=True,
        metadata={"help": "the C++ kernels on CPUs with AVX512-BF16 (engine/layers/cpu_kernels.py)"},
    )
    cuda_graphs: bool = field(
        default=True, metadata={"help": "replay decode steps from CUDA graphs (CUDA, triton attention)"}
    )
    fused_ops: bool = field(
        default=True,
        metadata={"help": "norms, SiLU, RoPE, K/V writes: one kernel each (with triton or cpu attention)"},
    )
    presets: str | None = field(
        default=None,
        metadata={"help": "a JSON file of extra instruction presets (docs/API.md, Instructions)"},
    )
    prefix_cache: bool = field(
        default=True, metadata={"help": "share the K/V of full prompt pages across jobs (engine/pages.py)"}
    )
    tensor_parallel: int = field(
        default=1,
        metadata={
            "help": "ranks the model is split over (engine/parallel.py); on CUDA, GPUs from --device on"
        },
    )


LAYOUTS = ("combined", "interleaved", "contiguous", "plain")
MAX_LIST = 256  # entries in a list option (stop strings, suppressed strings, biased tokens)
MAX_TEXT = 1000  # characters in one of its strings: a stop check per token reads a window of this size
MAX_LOGPROBS = 20  # top alternatives a token event may carry, as OpenAI's top_logprobs


@dataclass(frozen=True)
class JobOptions:
    """Every per-job option, once. ``Engine.submit`` takes them as keywords, ``POST /v1/jobs`` as body
    fields (server/schemas.py is checked against this class by a test), the command lines as flags.
    ``None`` leaves the choice to the engine: sampling from the model's generation config, the full
    instructions and the format guards for several workers, none for one. ``parse`` checks what needs
    no model (types, counts, ranges but the engine's limits); the engine checks the rest (presets, the
    vocabulary, the answer pattern) and its limits, naming the field each time."""

    workers: int = field(default=2, metadata={"help": "workers solving the problem together"})
    layout: str = field(default="combined", metadata={"help": f"one of {', '.join(LAYOUTS)}"})
    max_tokens: int = field(default=512, metadata={"help": "tokens each worker may generate"})
    temperature: float | None = field(
        default=None, metadata={"help": "0 is greedy; unset: the model's generation config"}
    )
    top_p: float | None = field(
        default=None, metadata={"help": "nucleus sampling, in (0, 1]; unset: the model's generation config"}
    )
    top_k: int | None = field(
        default=None, metadata={"help": "sample among the k likeliest tokens, 0: all; unset: the model's"}
    )
    seed: int | None = field(
        default=None, metadata={"help": "makes a sampled job reproducible; unset: a random one"}
    )
    stop: tuple[str, ...] = field(default=(), metadata={"help": "strings that stop a worker"})
    logit_bias: tuple[tuple[int, float], ...] = field(
        default=(), metadata={"help": "token id -> added logit in [-100, 100], as OpenAI's"}
    )
    quick_check_every: int = field(
        default=1024, metadata={"help": "tokens between 'am I doing redundant work?' checks; 0: never"}
    )
    finisher: bool = field(default=True, metadata={"help": "ask for a boxed answer when the workers stop"})
    finisher_tokens: int = field(default=16, metadata={"help": "tokens the finisher may write"})
    checkpoints: tuple[int, ...] = field(
        default=(), metadata={"help": "budgets (tokens per worker) at which to read off an answer"}
    )
    instructions: str | None = field(
        default=None,
        metadata={
            "help": "preset: full, short, none or a loaded one; unset: full for 2+ workers, none for 1"
        },
    )
    suppress: bool | tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "the format guards (true/false), or strings never to sample; unset: the guards for 2+ "
            "workers, none for 1"
        },
    )
    answer_pattern: str | None = field(
        default=None, metadata={"help": "a regex with one group; unset: the rightmost \\boxed{}"}
    )
    logprobs: int | None = field(
        default=None,
        metadata={"help": f"each sampled token's logprob and its top N alternatives (0 to {MAX_LOGPROBS})"},
    )
    trace: bool = field(default=False, metadata={"help": "record the job for the oracle (engine only)"})

    @classmethod
    def parse(cls, params: dict[str, Any]) -> JobOptions:
        """The options from plain data (keywords, a decoded message): lists become tuples, a lone stop
        string a tuple of one, ``logit_bias`` a sorted tuple of pairs; InvalidRequest names the field."""
        known = {f.name for f in fields(cls)}
        for name in params:
            if name not in known:
                raise InvalidRequest(name, f"unknown option {name!r}")
        values = {k: v for k, v in params.items() if v is not None}
        stop = values.get("stop", ())
        values["stop"] = _strings("stop", [stop] if isinstance(stop, str) else stop)
        if isinstance(values.get("suppress"), (list, tuple)):
            values["suppress"] = _strings("suppress", values["suppress"])
        values["checkpoints"] = tuple(_sequence("checkpoints", values.get("checkpoints", ()), 64))
        values["logit_bias"] = _bias(values.get("logit_bias", ()))
        options = cls(**values)
        options._check_types()
        return options

    def _check_types(self) -> None:
        def whole(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            if value is None or (_is_int(value) and low <= value and (high is None or value <= high)):
                return
            bound = f">= {low}" if high is None else f"between {low} and {high}"
            raise InvalidRequest(name, f"{name} must be an integer {bound}")

        whole("workers", 1)
        whole("max_tokens", 1)
        whole("quick_check_every", 0)
        whole("finisher_tokens", 1, 1024)
        whole("top_k", 0)
        whole("logprobs", 0, MAX_LOGPROBS)
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise InvalidRequest("seed", "seed must be an integer in [-2**63, 2**64)")
        if self.layout not in LAYOUTS:
            raise InvalidRequest("layout", f"layout must be one of {', '.join(LAYOUTS)}")
        if self.layout == "plain" and self.workers != 1:
            raise InvalidRequest("workers", "the plain layout is one ordinary sequence: workers must be 1")
        if self.temperature is not None and (
            not _is_number(self.temperature) or not 0 <= self.temperature < math.inf
        ):
            raise InvalidRequest("temperature", "temperature must be a finite number >= 0")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise InvalidRequest("top_p", "top_p must be in (0, 1]")
        if any(not _is_int(b) or not 1 <= b <= self.max_tokens for b in self.checkpoints):
            raise InvalidRequest("checkpoints", "checkpoints must be at most 64 budgets in [1, max_tokens]")
        for name in ("finisher", "trace"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(name, f"{name} must be true or false")
        for name in ("instructions", "answer_pattern"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidRequest(name, f"{name} must be a string")

    def within(self, max_workers: int, max_tokens: int) -> None:
        """The engine's limits, named."""
        if self.workers > max_workers:
            raise InvalidRequest("workers", f"workers must be between 1 and {max_workers}")
        if self.max_tokens > max_tokens:
            raise InvalidRequest("max_tokens", f"max_tokens must be between 1 and {max_tokens}")


def add_job_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every job option but ``trace`` (``--max-tokens 64``, ``--stop X --stop Y``,
    ``--logit-bias ID=BIAS``, ``--finisher false`` or ``--no-finisher``), all defaulting to None: what a
    command line leaves out stays the engine's default, which its help shows."""
    for f in fields(JobOptions):
        if f.name == "trace":
            continue
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type)
        text = f.metadata.get("help", "")
        if f.name in ("suppress", "logit_bias") or kind.startswith("tuple[str"):
            what, unset, meaning = text.partition("; unset: ")
            text = f"{what}, one per flag{unset}{meaning}"
        help = flag_help(text, f.default)
        if f.name == "suppress":
            parser.add_argument(flag, action="append", metavar="TEXT", help=help)
            parser.add_argument(
                "--no-suppress",
                dest=f.name,
                action="store_const",
                const=False,
                help="same as --suppress false",
            )
        elif f.name == "logit_bias":
            parser.add_argument(flag, action="append", type=_bias_flag, metavar="ID=BIAS", help=help)
        elif kind == "bool":
            parser.add_argument(flag, type=parse_bool, metavar="true|false", help=help)
            parser.add_argument(
                "--no-" + f.name.replace("_", "-"),
                dest=f.name,
                action="store_const",
                const=False,
                help=f"same as {flag} false",
            )
        elif kind.startswith("tuple[str"):
            parser.add_argument(flag, action="append", metavar="TEXT", help=help)
        elif kind.startswith("tuple[int"):
            parser.add_argument(flag, type=int, nargs="+", metavar="N", help=help)
        else:
            number = int if kind.startswith("int") else float if kind.startswith("float") else str
            choices = LAYOUTS if f.name == "layout" else None
            metavar = {int: "N", float: "X"}.get(number)
            parser.add_argument(flag, type=number, choices=choices, metavar=metavar, help=help)


def flag_help(text: str | None, default: Any) -> str:
    """A flag's ``--help`` text: what it does, then its default as a command line would write it. A text
    that ends with ``; unset: MEANING`` says what an unset (None) default means, and that is shown as the
    default. argparse formats help with ``%``, so a literal one is doubled."""
    text, _, unset = (text or "").partition("; unset: ")
    shown = unset if default is None and unset else shown_default(default)
    return f"{text} (default: {shown})".strip().replace("%", "%%")


def shown_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def job_params(args: argparse.Namespace) -> dict[str, Any]:
    """The job options a command line was given, as JSON-ready keywords (``logit_bias`` keyed by id)."""
    params = {f.name: getattr(args, f.name, None) for f in fields(JobOptions)}
    if params["logit_bias"]:
        params["logit_bias"] = {str(token): bias for token, bias in params["logit_bias"]}
    return {k: v for k, v in params.items() if v is not None}


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _bias_flag(text: str) -> tuple[int, float]:
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS, not {text!r}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sequence(name: str, value: Any, most: int = MAX_LIST) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise InvalidRequest(name, f"{name} must be a list")
    if len(value) > most:
        raise InvalidRequest(name, f"{name} takes at most {most} entries")
    return list(value)


def _strings(name: str, value: Any) -> tuple[str, ...]:
    items = _sequence(name, value)
    if not all(isinstance(x, str) and x for x in items):
        raise InvalidRequest(name, f"{name} must be a non-empty string or a list of them")
    if any(len(x) > MAX_TEXT for x in items):
        raise InvalidRequest(name, f"{name} strings must be at most {MAX_TEXT} characters")
    return tuple(items)


def _bias(value: Any) -> tuple[tuple[int, float], ...]:
    """``{token id: bias}`` (ids as JSON's string keys or ints) or pairs, to sorted (int, float) pairs."""
    pairs = list(value.items()) if isinstance(value, dict) else _sequence("logit_bias", value)
    if len(pairs) > MAX_LIST:
        raise InvalidRequest("logit_bias", f"logit_bias takes at most {MAX_LIST} entries")
    out = {}
    for pair in pairs:
        try:
            token, bias = pair
            token = int(token) if not isinstance(token, bool) else None
        except (TypeError, ValueError):
            token = None
        if token is None or not _is_number(bias) or not -100 <= bias <= 100:
            raise InvalidRequest("logit_bias", "logit_bias maps token ids to numbers between -100 and 100")
        out[token] = float(bias)
    return tuple(sorted(out.items()))


NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Nia")


def worker_name(index: int) -> str:
    base = NAMES[index % len(NAMES)]
    return base if index < len(NAMES) else f"{base}{index // len(NAMES) + 1}"


def read_secret(path: str) -> bytes:
    """The shared secret of an engine and its servers: the file's bytes, surrounding whitespace dropped."""
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise ValueError(f"the secret in {path} is shorter than 16 bytes")
    return secret


def secret_answer(secret: bytes, nonce: bytes) -> bytes:
    """What a front end answers an engine's challenge with."""
    return hmac.new(secret, nonce, hashlib.sha256).digest()


def is_loopback(address: str) -> bool:
    """Whether an engine listening there is reachable from this machine only (a Unix socket is)."""
    family, addr = parse_address(address)
    if family == socket.AF_UNIX:
        return True
    host = addr[0]
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def parse_address(address: str) -> tuple[int, Any]:
    """``host:port`` (TCP) or a filesystem path (a Unix socket)."""
    if ":" in address and not address.startswith(("/", ".")):
        host, _, port = address.rpartition(":")
        return socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"), int(port))
    return socket.AF_UNIX, address


# -- a job's events: the SSE frames' data, field for field -------------------------------------------

# A job is queued (also while prefilled), running, or ended; it ends with a finish reason: answer, stop,
# length (finished), cancelled or error (failed).
ENDED = ("finished", "cancelled", "failed")
STATUS_OF_REASON = {"cancelled": "cancelled", "error": "failed"}  # any other reason: finished


@dataclass(frozen=True)
class Token:
    """A token entering a worker's text. ``index`` counts the worker's tokens from 0; ``forced`` marks text
    the engine wrote for it (openers, step headers, quick checks, the finisher's prompt); ``finisher`` the
    final finisher's text, streamed as worker 0's. A job that asked for ``logprobs`` gets, on each token
    the model sampled (not forced ones), ``logprob``: its log-probability under the model's own
    distribution (the raw logits: before temperature, top-k, top-p, logit_bias and the format guards),
    and ``top_logprobs``: the most likely tokens, most likely first, as ``{"token_id", "text",
    "logprob"}``. Both are left out of the event's data otherwise."""

    worker: int
    text: str
    token_id: int
    index: int
    step: int
    forced: bool
    finisher: bool = False
    logprob: float | None = None
    top_logprobs: list[dict[str, Any]] | None = None

    OMIT_WHEN_NONE: ClassVar[tuple[str, ...]] = ("logprob", "top_logprobs")


@dataclass(frozen=True)
class Step:
    """A worker finished a step; it joins the shared history."""

    worker: int
    step: int
    text: str


@dataclass(frozen=True)
class QuickCheck:
    worker: int
    step: int


@dataclass(frozen=True)
class Checkpoint:
    """The answer at a budget; ``tokens``: what all workers had generated when it was read."""

    budget: int
    answer: str | None
    tokens: int


@dataclass(frozen=True)
class Final:
    answer: str


@dataclass(frozen=True)
class Error:
    message: str


@dataclass(frozen=True)
class Done:
    """Always a job's last event."""

    finish_reason: str
    usage: dict[str, int]


Payload = Token | Step | QuickCheck | Checkpoint | Final | Error | Done
EVENT_TYPES = {
    Token: "token",
    Step: "step",
    QuickCheck: "quick_check",
    Checkpoint: "checkpoint",
    Final: "final",
    Error: "error",
    Done: "done",
}


@dataclass(frozen=True)
class Event:
    """One event of a job, as the engine makes it, the wire carries it and the server sends it on:
    ``seq`` numbers a job's events from 0 without gaps, ``data`` is the SSE frame's JSON (the fields of
    one payload class above)."""

    job_id: str
    seq: int
    type: str
    data: dict[str, Any]

    @classmethod
    def of(cls, job_id: str, seq: int, payload: Payload) -> Event:
        data = asdict(payload)
        for name in getattr(payload, "OMIT_WHEN_NONE", ()):
            if data[name] is None:
                del data[name]
        return cls(job_id, seq, EVENT_TYPES[type(payload)], data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def usage(prompt: int, completion: int, forced: int, cached: int = 0, checkpoints: int = 0) -> dict[str, int]:
    """A job's token counts: ``completion`` is what workers and the final finisher generated; ``forced``
    what the engine wrote for them; ``checkpoints`` what the checkpoint finishers generated (not output)."""
    return {
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "completion_tokens": completion,
        "forced_tokens": forced,
        "checkpoint_tokens": checkpoints,
        "total_tokens": prompt + completion,
    }


def history_entry(step: dict[str, Any]) -> dict[str, Any]:
    """What a job's ``history`` lists of a finished step (a Step event's data)."""
    return {
        "worker": step["worker"],
        "name": worker_name(step["worker"]),
        "step": step["step"],
        "text": step["text"],
    }


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES, strict_map_key=True)
