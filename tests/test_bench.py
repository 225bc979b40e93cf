"""Every ``python -m bench`` subcommand runs end to end on a tiny model and writes the JSON it promises.

Only the shape of the output is checked (keys present, numbers positive, the machine recorded): the CPU is
shared, so no test here asserts anything about speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import main
from bench.common import summary
from tests.server_process import API_KEY

MACHINE_KEYS = {"cpu", "cores", "torch", "transformers", "python", "device", "date"}


def run_bench(tmp_path: Path, command: str) -> dict[str, Any]:
    """Run ``python -m bench <command>`` in-process with a JSON and a plot under tmp_path; the record."""
    argv = command.split()
    out = tmp_path / f"{argv[0]}.json"
    assert main([*argv, "--out", str(out), "--plot"]) == 0
    assert out.with_suffix(".png").stat().st_size > 0
    record = json.loads(out.read_text())
    assert record["machine"].keys() >= MACHINE_KEYS
    assert record["machine"]["cores"] > 0
    assert record["method"] and record["config"] and record["results"]
    return record


def positive(row: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert row[key] > 0, (key, row)


def test_engine(tmp_path: Path) -> None:
    record = run_bench(tmp_path, "engine --shape tiny --workers 1 2 --contexts 32 200 --tokens 4")
    rows = record["results"]
    assert {(r["kind"], r["sequences"], r["context"]) for r in rows} == {
        (kind, n, c)
        for c in (32, 200)
        for kind, n in (("generate", 1), ("hogwild", 1), ("hogwild", 2), ("independent", 2))
    }
    for row in rows:
        positive(row, "tokens_per_s", "step_ms", "floor_ms", "tokens", "steps", "prompt_tokens")
        assert row["speedup_vs_generate"] > 0 and row["speedup_vs_1_worker"] > 0
    positive(record["config"], "weight_bytes", "bandwidth_bytes_per_s", "weight_floor_ms")


def test_engine_split_over_ranks(tmp_path: Path) -> None:
    """One run, one engine per --tensor-parallel value; generate once, beside the first."""
    command = (
        "engine --shape tiny --workers 2 --contexts 32 --tokens 4 --no-independent --tensor-parallel 1 2"
    )
    rows = run_bench(tmp_path, command)["results"]
    assert sorted((r["kind"], r["tensor_parallel"]) for r in rows) == [
        ("generate", 1),
        ("hogwild", 1),
        ("hogwild", 2),
    ]
    for row in rows:
        positive(row, "tokens_per_s", "step_ms", "tokens")


def test_jobs(tmp_path: Path) -> None:
    record = run_bench(tmp_path, "jobs --shape tiny --concurrency 1 3 --tokens 48 --prompt-tokens 32")
    rows = record["results"]["jobs"]
    assert [(r["prefix_cache"], r["concurrency"]) for r in rows] == [
        (True, 1),
        (True, 3),
        (False, 1),
        (False, 3),
    ]
    for row in rows:
        positive(row, "tokens_per_s", "step_ms", "seconds", "steps", "decode_tokens_per_s", "pages_per_job")
        assert row["tokens"] == row["concurrency"] * 2 * 48  # EOS is suppressed: every worker writes 48
        for stat in ("latency_s", "ttft_s"):
            assert row[stat].keys() == {"mean", "p50", "p99"}
            assert 0 < row[stat]["p50"] <= row[stat]["p99"]
    on, off = rows[1], rows[3]
    # The instructions were cached before: the jobs read them, and share their pages.
    assert 0 < on["cached_tokens"] < on["prompt_tokens"] and off["cached_tokens"] == 0
    assert on["pages_per_job"] < off["pages_per_job"]
    first_on, first_off = record["results"]["first_token"]
    assert first_on["prefix_cache"] and first_on["cached_tokens"] > 0 and first_off["cached_tokens"] == 0
    positive(first_on, "cold_ttft_s", "cached_ttft_s")


def test_prefill(tmp_path: Path) -> None:
    record = run_bench(tmp_path, "prefill --shape tiny --prompt-tokens 200 --chunks 64 0 --warmup-steps 2")
    chunked, whole = record["results"]
    assert (chunked["prefill_chunk"], whole["prefill_chunk"]) == (64, 0)
    assert chunked["admission_steps"] > whole["admission_steps"] >= 1  # the chunks are steps of their own
    for row in (chunked, whole):
        positive(row, "long_ttft_s")
        assert row["itl_before_ms"]["p50"] > 0 and row["itl_during_ms"]["p99"] > 0


def test_attention(tmp_path: Path) -> None:
    record = run_bench(
        tmp_path,
        "attention --shape tiny --dtype float32 --workers 1 2 --common 32 --step-tokens 8 --repeats 1",
    )
    rows = record["results"]
    ops = {r["op"] for r in rows}
    assert {"sdpa 1 seq", "sdpa 2 seqs", "reference", "vectorized"} <= ops
    assert set(record["config"]["backends"]) | set(record["config"]["skipped"]) >= {"reference", "vectorized"}
    for row in rows:
        positive(row, "call_us", "step_ms", "floor_ms", "view_len", "vs_sdpa_1", "call_vs_sdpa_1")
        if row["max_abs_diff"] is not None:
            assert row["max_abs_diff"] < 1e-4  # in float32, every implementation agrees with the reference
    assert {r["view_len"] for r in rows if r["workers"] == 2} == {32 + 16 + 2 * 8}


@pytest.mark.parametrize(("via", "levels"), [("stream", "1 2"), ("events", "2")])
def test_serve(tmp_path: Path, server_url: str, via: str, levels: str) -> None:
    """Against the session's shared server (tests/conftest.py)."""
    flags = f"--api-key {API_KEY} --via {via} --concurrency {levels} --num-requests 2 --max-tokens 4"
    record = run_bench(tmp_path, f"serve --url {server_url} {flags}")
    assert record["config"]["model"]
    for row in record["results"]:
        assert row["failed"] == 0 and not row["errors"]
        positive(row, "output_tokens", "output_tokens_per_s", "requests_per_s", "seconds")
        for stat in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert 0 < row[stat]["p50"] <= row[stat]["p99"]
        assert 0 < row["cached_share"] < 1  # the template and instructions, never a request's own text


def test_serve_against_one_and_two_engines(tmp_path: Path, tiny_model_dir: Path) -> None:
    """``--data-parallel 1 2`` starts a server of each size and loads both alike."""
    flags = f"--api-key {API_KEY} --concurrency 2 --num-requests 2 --max-tokens 4"
    record = run_bench(tmp_path, f"serve --model {tiny_model_dir} --data-parallel 1 2 {flags}")
    assert [row["data_parallel"] for row in record["results"]] == [1, 2]
    for row in record["results"]:
        assert row["failed"] == 0 and not row["errors"]
        positive(row, "output_tokens_per_s", "requests_per_s")
        assert 0 < row["ttft_ms"]["p50"] <= row["ttft_ms"]["p99"]


def test_summary_percentiles() -> None:
    stats = summary([float(x) for x in range(1, 101)])
    assert stats == {"mean": 50.5, "p50": 50.5, "p99": 99.0}


def test_kernels(tmp_path: Path) -> None:
    """The Triton kernels (attention and the fused ops) compiled for an H100 on this CPU, in a subprocess:
    this one defined them for the interpreter. None spills registers, and the decode tile (4 workers x GQA 4,
    head_dim 128) loads K/V ahead of its dots."""
    pytest.importorskip("triton")
    out = tmp_path / "kernels.json"
    flags = "--targets 90 --dtypes bfloat16 --dims 80 128 --rows 16 --plot"
    env = os.environ | {"TRITON_INTERPRET": "0"}
    root = Path(__file__).parents[1]
    subprocess.run(
        [sys.executable, "-m", "bench", "kernels", *flags.split(), "--out", str(out)],
        env=env,
        cwd=root,
        check=True,
        timeout=300,
    )
    assert out.with_suffix(".png").stat().st_size > 0
    rows = json.loads(out.read_text())["results"]
    assert sorted((r["kernel"], r["width"]) for r in rows) == [
        ("add + rms_norm", 4096),
        ("attend", 80),
        ("attend", 128),
        ("merge", 80),
        ("merge", 128),
        ("qkv epilogue", 80),
        ("qkv epilogue", 128),
        ("silu x up", 12288),
    ]
    for row in rows:
        assert row["compile_s"] > 0
        assert 0 < row["registers"] <= 255 and row["stack_bytes"] == 0, row  # cuobjdump is in triton's wheel
    decode = next(r for r in rows if r["kernel"] == "attend" and r["width"] == 128)
    assert decode["block_m"] == 16 and decode["load_buffers"] >= 1 and decode["shared_bytes"] > 0
