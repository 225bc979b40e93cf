"""The contract between the engine process and its front ends: the engine's options, the messages of the
wire, where an engine listens, and the workers' names. It imports neither torch nor the rest of the engine,
so the HTTP server (and any other front end) loads without the model's libraries.

The wire is a stream of msgpack maps over one socket.

msgpack frames itself, so a streaming ``Unpacker`` needs no length prefix, and it decodes only plain data
(maps, lists, strings, numbers): nothing that arrives can run code, unlike pickle.

Front end to engine, each with a request number ``req`` that the reply carries back:
  ``{"type": "submit", "req", "job_id", "params": {...Engine.submit keywords}}``
  ``{"type": "cancel", "req", "job_id"}``, ``{"type": "stats", "req"}``, ``{"type": "shutdown", "req"}``
Engine to front end:
  ``{"type": "ready", "info": {...}}`` once the model is loaded, first on every connection;
  ``{"type": "reply", "req", "ok", "result" | "error", "code", "field"}``;
  ``{"type": "events", "step", "step_s", "events": [...]}``: one message per decode step with every event
  of that connection's jobs (Event.to_dict()) and how long the step took.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import msgpack

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Reply codes for refused requests; the server maps them to HTTP statuses.
INVALID, TOO_LONG, QUEUE_FULL, NOT_FOUND, SHUTTING_DOWN = (
    "invalid",
    "too_long",
    "queue_full",
    "not_found",
    "shutting_down",
)


@dataclass
class EngineOptions:
    """How an engine is set up: flags of ``python -m engine.serve`` and of the server, keywords of
    ``Engine``."""

    page_size: int = 16
    num_pages: int | None = None  # default: kv_tokens worth of pages
    kv_tokens: int | None = None  # default: 32768 on CPU, 90% of free memory on CUDA
    attention: str = "auto"  # "triton" on CUDA when triton is installed, else "vectorized"
    prefill_chunk: int = 512  # prompt tokens prefilled per step, over all jobs
    max_workers: int = 16
    max_tokens: int = 32768  # per worker
    max_running_jobs: int = 64
    max_queued_jobs: int = 256
    cpu_kernels: bool = True  # the C++ kernels on CPUs with AVX512-BF16 (engine/layers/cpu_kernels.py)
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs (CUDA, triton attention)
    fused_ops: bool = True  # norms, SiLU, RoPE, K/V writes: one kernel each (with triton or cpu attention)
    presets: str | None = None  # a JSON file of extra instruction presets (engine/prompts.py)
    prefix_cache: bool = True  # share the K/V of full prompt pages across jobs (engine/block_manager.py)


NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Nia")


def worker_name(index: int) -> str:
    base = NAMES[index % len(NAMES)]
    return base if index < len(NAMES) else f"{base}{index // len(NAMES) + 1}"


def parse_address(address: str) -> tuple[int, Any]:
    """``host:port`` (TCP) or a filesystem path (a Unix socket)."""
    if ":" in address and not address.startswith(("/", ".")):
        host, _, port = address.rpartition(":")
        return socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"), int(port))
    return socket.AF_UNIX, address


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BYTES, strict_map_key=True)
