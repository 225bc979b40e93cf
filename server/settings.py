"""Server configuration: environment variables ``HOGWILD_*``, overridden by command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.protocol import EngineOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOGWILD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None  # hub id, local folder or .gguf; None: the embedded default
    device: str = "cpu"
    dtype: str | None = None
    engine_address: str | None = None  # connect to a standalone engine instead of spawning one
    api_key: SecretStr | None = None  # Bearer token required on every /v1 route when set
    cors_origins: list[str] = []
    max_body_bytes: int = 1_000_000
    body_timeout_s: float = 30.0  # a request body that stops arriving this long gets 408
    retain_jobs: int = 1000  # ended jobs kept for GET and replay, oldest dropped first
    keepalive_s: float = 15.0  # SSE comment interval while a stream has nothing else to say
    ready_timeout_s: float = 1800.0  # first start may fetch and convert the default model
    # A busy engine that sends nothing this long is stalled: /ready says 503, requests fail fast with 503,
    # and every command to the engine waits at most this long.
    engine_stall_s: float = 30.0
    engine_kill_s: float = 120.0  # ... and a spawned engine stalled this long is killed and restarted
    log_level: str = "info"
    # Engine options; None keeps the engine's default (see engine.protocol.EngineOptions).
    page_size: int | None = None
    num_pages: int | None = None
    kv_tokens: int | None = None
    attention: str | None = None
    prefill_chunk: int | None = None
    max_workers: int | None = None
    max_tokens: int | None = None
    max_running_jobs: int | None = None
    max_queued_jobs: int | None = None
    cpu_kernels: bool | None = None
    cuda_graphs: bool | None = None
    fused_ops: bool | None = None
    presets: str | None = None  # a JSON file of extra instruction presets (docs/API.md, "Instructions")
    prefix_cache: bool | None = None
    tensor_parallel: int | None = None  # ranks the model is split over (GPUs from --device on)

    def engine_args(self) -> list[str]:
        """Flags for ``python -m engine.serve``: the model and every engine option that was set."""
        args = ["--device", self.device]
        if self.model:
            args += ["--model", self.model]
        if self.dtype:
            args += ["--dtype", self.dtype]
        for f in dataclasses.fields(EngineOptions):
            value = getattr(self, f.name)
            if value is not None:
                args += ["--" + f.name.replace("_", "-"), str(value)]
        return args


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Every settings field is also a flag (``--max-workers 8``); flags win over the environment."""
    parser = argparse.ArgumentParser(
        prog="hogwild-server", description="Serve Hogwild! inference over HTTP (flags override HOGWILD_* env)"
    )
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "cors_origins":
            parser.add_argument(flag, nargs="*", default=None, help="allowed CORS origins")
        else:
            parser.add_argument(flag, default=None, help=field.description)
    given: dict[str, Any] = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Settings(**given)
