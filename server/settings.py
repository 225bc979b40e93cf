"""Server configuration: environment variables ``HOGWILD_*``, overridden by command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.protocol import DEVICE_HELP, DTYPE_HELP, MODEL_HELP, EngineOptions, flag_help


class Settings(BaseSettings):
    """Each field's description is its flag's ``--help``; an engine option's comes from EngineOptions."""

    model_config = SettingsConfigDict(env_prefix="HOGWILD_", extra="ignore")

    host: str = Field(default="127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(default=8000, description="port to listen on")
    model: str | None = Field(default=None, description=MODEL_HELP)
    device: str = Field(default="cpu", description=DEVICE_HELP)
    dtype: str | None = Field(default=None, description=DTYPE_HELP)
    engine_address: str | None = Field(
        default=None,
        description="host:port or Unix socket path of a standalone engine to use, several joined by commas "
        "(the flag may repeat): jobs go to the ready engine with the shortest queue, most free pages; "
        "unset: spawn engines",
    )
    engine_secret_file: str | None = Field(
        default=None, description="the secret the standalone engines were given (their --secret-file)"
    )
    data_parallel: int = Field(
        default=1,
        description="engines to spawn, each on GPUs of its own (engine i: devices i*TP .. (i+1)*TP-1 on "
        "CUDA; on the CPU a share of the cores)",
    )
    api_key: SecretStr | None = Field(
        default=None, description="Bearer token required on every /v1 route; unset: none"
    )
    cors_origins: list[str] = Field(default=[], description="origins allowed by CORS (* for any)")
    max_body_bytes: int = Field(default=1_000_000, description="larger request bodies get 413")
    body_timeout_s: float = Field(
        default=30.0, description="a request body that stops arriving this long gets 408"
    )
    retain_jobs: int = Field(
        default=1000, description="ended jobs kept for GET and replay, oldest dropped first"
    )
    keepalive_s: float = Field(
        default=15.0, description="SSE comment interval while a stream has nothing else to say"
    )
    ready_timeout_s: float = Field(
        default=1800.0,
        description="how long the engine may take to start (the first may fetch and convert the model)",
    )
    engine_stall_s: float = Field(
        default=30.0,
        description="a busy engine that sends nothing this long is stalled: /ready says 503, requests fail "
        "fast with 503, and every command to the engine waits at most this long",
    )
    engine_kill_s: float = Field(
        default=120.0, description="a spawned engine stalled this long is killed and restarted"
    )
    log_level: str = Field(default="info", description="debug, info, warning or error")
    # Engine options: None keeps the engine's default; their help comes from EngineOptions.
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
    presets: str | None = None
    prefix_cache: bool | None = None
    tensor_parallel: int | None = None

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


JOINED = ("engine_address",)  # repeatable flags of one comma-joined setting


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Every settings field is also a flag (``--max-workers 8``); flags win over the environment."""
    parser = argparse.ArgumentParser(
        prog="hogwild-server",
        description="Serve Hogwild! inference over HTTP: the dashboard at /, the API under /v1.",
        epilog="Every flag is also an environment variable HOGWILD_<NAME> (HOGWILD_MAX_WORKERS=8); "
        "a flag wins.",
    )
    engine_fields = {f.name: f for f in dataclasses.fields(EngineOptions)}
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        text, default = field.description, field.default
        if name in engine_fields and default is None:  # the engine's own default applies
            text = text or engine_fields[name].metadata.get("help")
            default = engine_fields[name].default
        kind = field.annotation
        many = list in (typing.get_origin(kind), *map(typing.get_origin, typing.get_args(kind)))
        # A list: one or more values, and the flag may repeat (--cors-origins A B --cors-origins C). The
        # engine addresses are one string (commas, as the environment gives them), the flag repeatable.
        action = "extend" if many else "append" if name in JOINED else "store"
        parser.add_argument(
            flag,
            default=None,
            nargs="+" if many else None,
            action=action,
            metavar=_metavar(name, kind),
            help=flag_help(text, default),
        )
    given: dict[str, Any] = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    given.update({name: ",".join(given[name]) for name in JOINED if name in given})
    try:
        return Settings(**given)
    except ValidationError as exc:
        parser.error("; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()))


def _metavar(name: str, kind: Any) -> str | None:
    types = {kind, *typing.get_args(kind)}
    if bool in types:
        return "true|false"
    if int in types:
        return "N"
    if float in types:
        return "SECONDS" if name.endswith("_s") else "X"
    return None
