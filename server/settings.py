"""Server configuration: environment variables ``HOGWILD_*``, overridden by command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from pydantic import SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.protocol import EngineOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOGWILD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None  # hub id, local folder or .gguf; None: the embedded default
    device: str = "cpu"
    dtype: str | None = None
    # Connect to standalone engines instead of spawning: host:port or a Unix socket path, several joined by
    # commas (the flag may be repeated). Jobs go to the ready engine with the shortest queue, most free pages.
    engine_address: str | None = None
    engine_secret_file: str | None = None  # the secret the standalone engines were given (--secret-file)
    data_parallel: int = 1  # engines to spawn, each on its own GPUs (devices i*TP .. (i+1)*TP-1 on CUDA)
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

    @model_validator(mode="after")
    def _engines(self) -> Settings:
        if self.data_parallel < 1:
            raise ValueError("data_parallel must be at least 1")
        if self.data_parallel > 1 and self.engine_address:
            raise ValueError("give either data_parallel (engines to spawn) or engine_address, not both")
        if (
            self.data_parallel > 1
            and self.device.startswith("cuda")
            and self.device not in ("cuda", "cuda:0")
        ):
            raise ValueError("with data_parallel give --device cuda: each engine gets GPUs of its own")
        return self

    @property
    def engine_addresses(self) -> list[str]:
        return [a.strip() for a in (self.engine_address or "").split(",") if a.strip()]

    def engine_env(self, index: int) -> dict[str, str] | None:
        """The environment of spawned engine ``index`` when there are several: on CUDA its own GPUs (of
        those visible), on the CPU its share of the cores, unless OMP_NUM_THREADS says otherwise. None (this
        process's environment) for a lone engine."""
        if self.data_parallel == 1:
            return None
        env = dict(os.environ)
        if self.device.startswith("cuda"):
            tp = int(getattr(self, "tensor_parallel", None) or 1)  # GPUs per engine
            visible = env.get("CUDA_VISIBLE_DEVICES")
            count = self.data_parallel * tp
            devices = visible.split(",") if visible else [str(i) for i in range(count)]
            if len(devices) < count:
                raise ValueError(
                    f"{self.data_parallel} engines of {tp} GPUs need {count} GPUs, "
                    f"CUDA_VISIBLE_DEVICES has {len(devices)}"
                )
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[index * tp : (index + 1) * tp])
        elif "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.data_parallel))
        return env

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
        elif name == "engine_address":
            parser.add_argument(flag, action="append", default=None, help="a standalone engine (repeatable)")
        else:
            parser.add_argument(flag, default=None, help=field.description)
    given: dict[str, Any] = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if "engine_address" in given:
        given["engine_address"] = ",".join(given["engine_address"])
    try:
        return Settings(**given)
    except ValidationError as exc:
        parser.error("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()))
