"""Start-up that says what it does: each stage logged with its time, a ready line, a load line while busy;
what is slow to make (a converted GGUF, the compiled CPU kernels) cached by content, not by path."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from engine import loader
from engine.layers import cpu_kernels
from tests.server_process import ServerProcess
from tests.test_engine_process import run, spawn


def test_the_server_logs_each_stage_of_its_start_and_a_ready_line(server: ServerProcess) -> None:
    log = server.log.read_text()
    for stage in ("resolving", "loading the weights"):
        assert re.search(rf"{stage}.*: done in \d+\.\d s", log), log[-3000:]
    ready = re.search(r"ready: (http://\S+) \((.+) on cpu, (\w+), (\d+) KV pages of (\d+) tokens", log)
    assert ready is not None, log[-3000:]
    assert ready.group(1) == server.url and int(ready.group(4)) > 0


def test_a_busy_engine_logs_its_load(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOGWILD_LOG_EVERY_S", "0.2")

    async def scenario() -> None:
        client, rec = await spawn(tiny_model_dir)
        await client.submit("job-log", {"prompt": "Count.", "max_tokens": 400, "quick_check_every": 0})
        await asyncio.wait_for(rec.ended["job-log"].wait(), 120)
        await client.close()

    run(scenario())
    lines = re.findall(
        r"(\d+) running, (\d+) queued, ([\d.]+) generated tokens/s, KV pages (\d+)% used",
        capfd.readouterr().err,
    )
    assert lines and any(int(running) == 1 and float(speed) > 0 for running, _, speed, _ in lines), lines


def test_a_gguf_is_converted_once_per_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was converted again on every start (102 s to ready). The conversion itself is transformers'."""
    converted: list[Path] = []

    def convert(folder: Path, name: str, target: Path, dtype: torch.dtype) -> None:
        converted.append(target)
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "a" / "m.gguf"
    first.parent.mkdir()
    first.write_bytes(b"GGUF" + bytes(1000))
    elsewhere = tmp_path / "b" / "m.gguf"
    elsewhere.parent.mkdir()
    shutil.copy(first, elsewhere)
    assert loader.converted_gguf(first, torch.bfloat16) == loader.converted_gguf(elsewhere, torch.bfloat16)
    assert len(converted) == 1  # the same bytes at another path: converted once
    first.write_bytes(b"GGUF" + bytes(999) + b"\1")
    assert loader.converted_gguf(first, torch.bfloat16) != converted[0] and len(converted) == 2
    loader.converted_gguf(first, torch.float32)  # another dtype is another conversion
    assert len(converted) == 3


def test_engines_starting_together_convert_a_gguf_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server's several engines start at once: each converted the file and cleared the others' half-written
    folder. Now one converts while the others wait, then read what it made."""
    converted: list[Path] = []

    def convert(folder: Path, name: str, target: Path, dtype: torch.dtype) -> None:
        converted.append(target)
        time.sleep(0.3)  # long enough for the other engines to arrive meanwhile
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    monkeypatch.setenv("HOGWILD_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    with ThreadPoolExecutor(3) as pool:
        targets = set(pool.map(lambda _: loader.converted_gguf(gguf, torch.bfloat16), range(3)))
    assert len(targets) == 1 and len(converted) == 1


def test_the_kernel_build_is_keyed_by_its_sources_not_their_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keyed by torch's version alone, two checkouts rebuilt each other's kernels on every start."""
    key = cpu_kernels.build_key()
    copy = tmp_path / "csrc"
    shutil.copytree(cpu_kernels.CSRC, copy)
    monkeypatch.setattr(cpu_kernels, "CSRC", copy)
    assert cpu_kernels.build_key() == key
    (copy / "ops.cpp").write_text((copy / "ops.cpp").read_text() + "\n// changed\n")
    assert cpu_kernels.build_key() != key
