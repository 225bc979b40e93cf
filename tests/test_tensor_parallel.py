"""Tensor parallelism (engine/parallel.py) on the CPU over gloo: a model split over two ranks gives the
logits of the whole model and passes the oracle, for the oracle's families whose weights the cut treats
differently (GQA with KV heads split, a single KV head copied to both ranks, biases, tied embeddings), every
layout, float32 and bfloat16; a bad split is refused at start-up; a server runs jobs on two ranks,
restarts an engine that lost one, and leaves no rank behind."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch

from engine import Engine
from engine.models.llama import ModelShape
from engine.parallel import kv_heads_of, shard_state
from tests.models import FAMILIES, tiny_model
from tests.oracle_cases import TOL_FLOAT32, Oracle, compare
from tests.server_process import API_KEY, running_server

# Two GPUs where there are (bench/gpu_check.sh runs this file there: NCCL), else two CPU processes (gloo).
DEVICE = "cuda" if torch.cuda.device_count() >= 2 else "cpu"
PROMPT = "Add 2 and 3."
JOB: dict[str, Any] = dict(
    max_tokens=24, quick_check_every=6, finisher=True, instructions="short", trace=True
)
LAYOUTS = [("combined", 3), ("interleaved", 2), ("contiguous", 2), ("plain", 1)]


def engine(model: Any, tok: Any, **options: Any) -> Engine:
    return Engine.from_hf(model, tok, page_size=4, num_pages=4096, prefill_chunk=96, **options)


def on_device(model: Any) -> Any:
    """The model where the engine runs: the oracle replays there."""
    return torch.nn.Module.to(model, DEVICE)


def spread_error(a: Any, b: Any) -> float:
    """The largest difference of two jobs' logits over their rows, relative to each row's spread."""
    worst = 0.0
    for step_a, step_b in zip(a.trace, b.trace, strict=True):
        for row_a, row_b in zip(step_a.rows, step_b.rows, strict=True):
            if row_a.logits is None:
                assert row_b.logits is None
                continue
            spread = float(row_a.logits.max() - row_a.logits.min())
            worst = max(worst, float((row_a.logits - row_b.logits).abs().max()) / spread)
    return worst


# The families whose weights the cut treats differently (biases, tied embeddings, one KV head, q/k norms);
# the others differ only in RoPE, which every rank computes whole.
SPLIT_FAMILIES = [*FAMILIES, "llama-bias", "llama-tied"]


@pytest.mark.parametrize("family", SPLIT_FAMILIES)
def test_two_ranks_give_the_logits_of_one_and_pass_the_oracle(tok: Any, family: str) -> None:
    model = on_device(tiny_model(family, tok))
    oracle = Oracle(model)
    one, two = engine(model, tok), engine(model, tok, tensor_parallel=2)
    try:
        assert two.shape.num_heads * 2 == one.shape.num_heads
        for layout, workers in LAYOUTS:
            a = one.generate(PROMPT, workers=workers, layout=layout, **JOB)
            b = two.generate(PROMPT, workers=workers, layout=layout, **JOB)
            assert b.transcript == a.transcript, layout
            assert spread_error(a, b) <= TOL_FLOAT32, layout
            failures = compare(model, b, oracle).failures()
            assert not failures, f"{layout}: " + "\n".join(failures[:12])
    finally:
        two.close()


def test_bfloat16_ranks_stay_within_transformers_error(tok: Any) -> None:
    """bfloat16 (the CPU kernels' linear where the CPU has them), KV heads split two ways."""
    model = torch.nn.Module.to(on_device(tiny_model("qwen3-qknorm", tok)), torch.bfloat16)
    two = engine(model, tok, tensor_parallel=2)
    try:
        job = two.generate(PROMPT, workers=3, layout="combined", **JOB)
    finally:
        two.close()
    result = compare(model, job, Oracle(model))
    assert result.baseline is not None and result.baseline > 100 * TOL_FLOAT32
    assert not result.failures(), "\n".join(result.failures()[:12])


def test_each_rank_holds_its_share(tok: Any) -> None:
    """The cut itself: query heads and MLP channels split, KV heads split or copied, row biases once."""
    model = tiny_model("llama-bias", tok)
    state = model.state_dict()
    whole = ModelShape.from_config(model.config, state)
    d = whole.head_dim
    shards = [shard_state(state, whole, r, 2) for r in range(2)]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(torch.cat([s[q] for s in shards]), state[q])
    down = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(torch.cat([s[down] for s in shards], dim=1), state[down])
    bias = "model.layers.0.self_attn.o_proj.bias"
    assert torch.equal(shards[0][bias] + shards[1][bias], state[bias]) and not shards[1][bias].any()
    k = "model.layers.0.self_attn.k_proj.weight"  # one KV head: both ranks read it
    assert whole.num_kv_heads == 1 and all(torch.equal(s[k], state[k][:d]) for s in shards)
    assert [kv_heads_of(whole, r, 4) for r in range(4)] == [range(0, 1)] * 4
    heads = torch.cat([s["lm_head.weight"] for s in shards])
    assert (
        torch.equal(heads[: whole.vocab_size], state["lm_head.weight"])
        and not heads[whole.vocab_size :].any()
    )


@pytest.mark.parametrize(
    ("ranks", "device", "message"),
    [(3, "cpu", "does not divide 4 attention heads"), (2, "cuda:0", "needs 2 GPUs")],
)
def test_a_split_that_cannot_be_made_is_refused(tok: Any, ranks: int, device: str, message: str) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    with pytest.raises(ValueError, match=message):
        engine(tiny_model("qwen2-bias", tok), tok, tensor_parallel=ranks, device=device)


def ranks_of(server: Any) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The spawned engine's follower ranks, and all its children (multiprocessing's tracker too)."""
    children = psutil.Process(server.engine_pid()).children()
    return [c for c in children if "spawn_main" in " ".join(c.cmdline())], children


def run_job(http: httpx.Client) -> dict[str, Any]:
    job = http.post("/v1/jobs", json={"prompt": PROMPT, "workers": 2, "max_tokens": 16}).json()
    with http.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
        lines = [line for line in events.iter_lines() if line.startswith("event:")]
    assert lines[-1] == "event: done"
    return dict(http.get(f"/v1/jobs/{job['id']}").json())


def test_a_server_runs_jobs_on_two_ranks_restarts_a_lost_one_and_leaves_none_behind(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with running_server(tiny_model_dir, tmp_path, "--tensor-parallel", "2") as server:
        ranks, children = ranks_of(server)
        assert len(ranks) == 1  # rank 0 is the engine process itself
        assert " on 2 ranks from cpu, " in server.log.read_text()  # the ready line
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            done = run_job(http)
            assert done["status"] == "finished" and done["usage"]["completion_tokens"] > 0
            # A lost rank stops its engine even while idle; the server starts a new one.
            engine = server.engine_pid()
            ranks[0].kill()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                ready = http.get("/ready")
                if ready.status_code == 200 and server.engine_pid() != engine:
                    break
                time.sleep(0.25)
            assert server.engine_pid() != engine, ready.text
            assert run_job(http)["status"] == "finished"
            ranks, more = ranks_of(server)
            assert len(ranks) == 1
    psutil.wait_procs(children + more, timeout=30)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children + more)
