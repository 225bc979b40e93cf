"""The engine against the independent reference (tests/reference_hogwild.py; docs/ARCHITECTURE.md, "Trace
and oracle").

Each job is replayed from its trace through transformers' own forward, in float64, with a naive re-rotating
cache; every row the engine sampled from must match it within the tolerance of the engine's dtype, its
token must be the oracle's choice (greedy or drawn at the trace's uniform), and its view must list the
blocks in the layout's documented order (tests/oracle_cases.py says how, and why the tolerances are what
they are). The jobs run with quick checks and the finisher; wrong variants of the reference show that the
tolerance catches real mistakes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import Engine
from engine.collab import QUICK_CHECK
from engine.layers.cpu_kernels import load_cpu_kernels
from engine.trace import TraceRow, TraceStep
from tests.models import FAMILIES, MORE_FAMILIES, tiny_model
from tests.oracle_cases import (
    BF16_MULTIPLE,
    TOL_FLOAT32,
    Oracle,
    compare,
    documented_view,
    view_problems,
)
from tests.reference_hogwild import WRONG_VARIANTS, redraw

BACKENDS = ["vectorized", "reference"] + (["cpu"] if load_cpu_kernels() else [])
PROMPT = "Add 2 and 3."
# Short instructions keep the replays quick; one case below runs the full preset's long prompt.
# Quick checks every 6 tokens: their headers fill a worker's cap (max_tokens + 74 written tokens) before
# it writes 40 tokens, so a worker samples 9 to 18 times.
JOB: dict[str, Any] = dict(
    max_tokens=40, quick_check_every=6, finisher=True, instructions="short", trace=True
)


def check_against_reference(model: Any, job: Any, oracle: Oracle | None = None) -> int:
    """Asserts that ``job`` (run by an engine built from ``model``) passes the oracle; the rows compared."""
    result = compare(model, job, oracle)
    failures = result.failures()
    assert not failures, "\n".join(failures[:12])
    return result.rows


def run_job(model: Any, tok: Any, attention: str, **options: Any) -> Any:
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=4096, attention=attention, prefill_chunk=96)
    return eng.generate(PROMPT, **{**JOB, **options})


def rollovers_per_worker(job: Any) -> list[int]:
    done = [r.worker for step in job.trace for r in step.rollovers]
    return [done.count(w) for w in range(job.options.workers)]


def forced_text(tok: Any, job: Any) -> str:
    """Every multi-token row's text: openers, headers, quick checks, the finisher's prompt."""
    return "".join(tok.decode(r.tokens) for step in job.trace for r in step.rows if len(r.tokens) > 1)


def check_job_shape(tok: Any, job: Any, rolls: bool = True) -> None:
    """The jobs exercise what they should: rollovers and quick checks where steps roll over, the finisher."""
    workers = job.options.workers
    finisher_rows = [r for step in job.trace for r in step.rows if r.worker < -1 and r.logits is not None]
    assert len(finisher_rows) >= 2, "the finisher did not run"
    if rolls and job.options.layout in ("combined", "interleaved"):
        assert min(rollovers_per_worker(job)) >= 3, rollovers_per_worker(job)
        assert QUICK_CHECK.strip() in forced_text(tok, job)
    assert sum(r.logits is not None for s in job.trace for r in s.rows if r.worker >= 0) >= 8 * workers


CASES = [(layout, w) for layout in ("combined", "interleaved", "contiguous") for w in (1, 2, 3, 5)]
CASES.append(("plain", 1))


@pytest.mark.parametrize(("layout", "workers"), CASES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_matches_reference(tok: Any, family: str, layout: str, workers: int) -> None:
    """float32, every attention backend on the same job (their traces are replayed once when equal)."""
    model = tiny_model(family, tok)
    oracle = Oracle(model)
    for attention in BACKENDS:
        job = run_job(model, tok, attention, workers=workers, layout=layout)
        result = compare(model, job, oracle)
        failures = result.failures()
        assert not failures, f"{attention}: " + "\n".join(failures[:12])
        check_job_shape(tok, job)


@pytest.mark.parametrize(("layout", "workers"), [("combined", 3), ("interleaved", 3), ("contiguous", 2)])
@pytest.mark.parametrize("family", list(MORE_FAMILIES))
def test_more_families_match_reference(tok: Any, family: str, layout: str, workers: int) -> None:
    """Biases, tied embeddings, linear RoPE and Mistral on fewer layouts and worker counts.

    No seed makes the tied model roll over (its '.' row is also '.''s embedding, so after '.' it writes
    '.' again): its jobs are checked without rollovers."""
    model = tiny_model(family, tok)
    oracle = Oracle(model)
    for attention in BACKENDS:
        job = run_job(model, tok, attention, workers=workers, layout=layout)
        assert check_against_reference(model, job, oracle) >= 8 * workers, attention
        check_job_shape(tok, job, rolls=family != "llama-tied")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_engine_is_within_transformers_error(tok: Any, family: str) -> None:
    """A bfloat16 engine's error stays within BF16_MULTIPLE times transformers' own bfloat16 error on the
    same trace (and transformers' is far above the float32 tolerance: the comparison is not vacuous)."""
    model = tiny_model(family, tok)
    torch.nn.Module.to(model, torch.bfloat16)
    oracle = Oracle(model)
    for attention in BACKENDS:
        job = run_job(model, tok, attention, workers=3, layout="combined")
        result = compare(model, job, oracle)
        assert result.baseline is not None and result.baseline > 100 * TOL_FLOAT32
        assert result.tolerance == BF16_MULTIPLE * result.baseline
        failures = result.failures()
        assert not failures, f"{attention}: " + "\n".join(failures[:12])
        assert result.argmax_agree + result.near_ties == result.greedy >= 40


# Sampled jobs write varied text, so their distributions are flat: top-k keeps the kept set small enough
# that a float32 engine's CDF ends are sure to a small fraction of an interval (over all 49k tokens at
# temperature 1 about 5% of draws lie within the slack of an end: all still match, but not rarely).
SAMPLED = [
    ("llama-gqa4", "combined", 3, dict(temperature=2.0, top_k=50, seed=1)),
    (
        "qwen3-qknorm",
        "interleaved",
        2,
        dict(temperature=3.0, top_k=20, top_p=0.9, seed=2, logit_bias={13: 2.0}),
    ),
    ("mistral", "contiguous", 2, dict(temperature=1.5, top_k=100, top_p=0.95, seed=3)),
]


@pytest.mark.parametrize(("family", "layout", "workers", "sampling"), SAMPLED, ids=[c[0] for c in SAMPLED])
def test_sampled_jobs_redraw_the_same_tokens(
    tok: Any, family: str, layout: str, workers: int, sampling: dict[str, Any]
) -> None:
    """Each sampled token is the oracle's own float64 draw at the trace's uniform; a draw near a CDF
    boundary may differ, and such draws are rare. A sampler that is off (twice the temperature, one more
    token kept by top-k, the CDF read from the other end) gives other tokens: the check would see it."""
    model = tiny_model(family, tok)
    oracle = Oracle(model)
    job = run_job(model, tok, "auto", workers=workers, layout=layout, **sampling)
    result = compare(model, job, oracle)
    assert not result.failures(), "\n".join(result.failures()[:12])
    assert result.draws >= 8 * workers and result.draws_equal >= result.draws - result.near_boundary
    assert result.greedy >= 2  # the finisher decodes greedily

    p = job.sampling
    rows = [
        (row, ref)
        for step, step_refs in zip(job.trace, oracle.logits(job.trace), strict=True)
        for row, ref in zip(step.rows, step_refs, strict=True)
        if row.uniform is not None and ref is not None
    ]
    wrong: dict[str, Any] = {
        "twice the temperature": lambda ref, u, banned: redraw(
            ref, u, 2 * p.temperature, p.top_p, p.top_k, p.logit_bias, banned
        ),
        "one more in top-k": lambda ref, u, banned: redraw(
            ref, u, p.temperature, p.top_p, p.top_k + 1, p.logit_bias, banned
        ),
        "1 - u": lambda ref, u, banned: redraw(
            ref, 1 - u, p.temperature, p.top_p, p.top_k, p.logit_bias, banned
        ),
    }
    for name, draw in wrong.items():
        differ = sum(draw(ref, row.uniform, row.banned).token != row.next_token for row, ref in rows)
        assert differ >= len(rows) // 10, f"{name}: {differ} of {len(rows)} draws differ"


def test_wrong_variants_are_detected(tok: Any) -> None:
    """Deliberately wrong references (no same-step visibility, keys at block-local positions, YaRN's
    factor applied twice) each exceed the float32 tolerance on a real engine trace, by a wide margin."""
    model = tiny_model("yarn-rope", tok)
    oracle = Oracle(model)
    job = run_job(model, tok, "auto", workers=3, layout="combined")
    assert compare(model, job, oracle).margin < 1
    for name, variant in WRONG_VARIANTS.items():
        margin = compare(model, job, oracle, variant).margin
        assert margin > 100, f"{name}: error / tolerance {margin:.3g}"


def test_long_prompt_and_several_jobs_at_once_match_the_reference(tok: Any) -> None:
    """Rows of different jobs share forward passes; each job's trace still replays exactly. One job runs
    the full instructions (a prompt of over 1000 tokens: positions far from 0)."""
    model = tiny_model("qwen3-qknorm", tok)
    oracle = Oracle(model)
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=8192)
    options: dict[str, Any] = dict(max_tokens=24, quick_check_every=6, trace=True, instructions="short")
    shapes: list[tuple[int, str, dict[str, Any]]] = [
        (2, "combined", {"instructions": "full"}),
        (3, "interleaved", {}),
        (1, "contiguous", {"finisher": False}),
        (5, "combined", {}),
        (1, "plain", {}),
    ]
    jobs = [
        eng.submit(f"Job {i}", workers=w, layout=lay, **{**options, **extra})
        for i, (w, lay, extra) in enumerate(shapes)
    ]
    while not all(j.ended for j in jobs):
        eng.step()
    assert len(jobs[0].prompt_ids) > 1000
    for job in jobs:
        assert check_against_reference(model, job, oracle) > 0
    torch.testing.assert_close(torch.tensor(eng.free_pages), torch.tensor(eng.total_pages))


def test_views_are_checked_against_the_documented_order(tok: Any) -> None:
    """The documented orders, written out; a trace whose view swaps two blocks, or prefills the static
    blocks out of order, is caught."""
    assert documented_view("combined", 3, 1, "step:Bob") == [
        "common", "others_header", "step:Alice", "cut:1", "step:Carol", "own_header", "step:Bob",
    ]  # fmt: skip
    assert documented_view("contiguous", 3, 2, "out:Carol") == [
        "common", "out:Alice", "cut:1", "out:Bob", "own_header", "out:Carol",
    ]  # fmt: skip
    assert documented_view("interleaved", 3, 0, "step:Alice") == ["common", "step:Alice"]
    assert documented_view("combined", 2, -1, "cut:2") == ["common", "others_header", "cut:2"]
    assert documented_view("contiguous", 2, -1, "own_header") == ["common", "own_header"]
    assert documented_view("interleaved", 2, -3, "finisher:1") == [
        "common", "others_header", "step:Alice", "cut:1", "step:Bob", "cut:2", "finisher:1",
    ]  # fmt: skip
    assert documented_view("plain", 1, -2, "finisher:0") == ["common", "out:Alice", "finisher:0"]

    model = tiny_model("llama-gqa4", tok)
    job = run_job(model, tok, "auto", workers=3, layout="combined", max_tokens=8)
    assert view_problems(job.trace, "combined", 3) == []
    assert view_problems(job.trace, "contiguous", 3) != []
    decode = next(s for s, step in enumerate(job.trace) if any(r.worker == 2 for r in step.rows))
    swapped = [TraceStep(list(step.rows), list(step.rollovers)) for step in job.trace]
    row = next(r for r in swapped[decode].rows if r.worker == 2)
    view = list(row.view)
    view[2], view[4] = view[4], view[2]  # Bob's block before Alice's
    swapped[decode].rows[swapped[decode].rows.index(row)] = dataclasses.replace(row, view=view)
    assert len(view_problems(swapped, "combined", 3)) == 1
    prefill = [s for s, step in enumerate(job.trace) if step.rows and step.rows[0].worker == -1]
    reordered = list(job.trace)
    reordered[prefill[-1]], reordered[prefill[-2]] = reordered[prefill[-2]], reordered[prefill[-1]]
    assert any("prefilled" in p for p in view_problems(reordered, "combined", 3))


def test_a_wrong_row_is_reported(tok: Any) -> None:
    """The comparison fails a job whose logits or tokens are off: it can fail."""
    model = tiny_model("llama-gqa4", tok)
    oracle = Oracle(model)
    job = run_job(model, tok, "auto", workers=2, layout="combined", max_tokens=8)
    assert compare(model, job, oracle).failures() == []
    step = next(s for s in job.trace if any(r.logits is not None and r.worker >= 0 for r in s.rows))
    i, row = next((i, r) for i, r in enumerate(step.rows) if r.logits is not None and r.worker >= 0)
    assert row.logits is not None and row.next_token is not None
    spread = float(row.logits.max() - row.logits.min())
    nudged = row.logits.clone()
    nudged[7] += 3 * TOL_FLOAT32 * spread
    step.rows[i] = dataclasses.replace(row, logits=nudged)
    assert any("tolerance" in f for f in compare(model, job, oracle).failures())
    others = torch.cat([row.logits[: row.next_token], row.logits[row.next_token + 1 :]])
    runner_up = int(others.argmax()) + (int(others.argmax()) >= row.next_token)
    step.rows[i] = dataclasses.replace(row, next_token=runner_up)
    failures = compare(model, job, oracle).failures()
    assert any("below the oracle's argmax" in f for f in failures), failures


def test_bench_oracle_command(tmp_path: Path) -> None:
    """``python -m bench oracle`` on one small case writes its table and the variants' margins."""
    from bench.__main__ import main

    out = tmp_path / "oracle.json"
    argv = ["oracle", "--families", "yarn-rope", "--layouts", "combined", "--workers", "2"]
    argv += ["--dtypes", "float32", "--backends", "vectorized", "--tokens", "12", "--out", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    (row,) = record["results"]["cases"]
    assert (row["family"], row["layout"], row["workers"], row["backend"]) == (
        "yarn-rope",
        "combined",
        2,
        "vectorized",
    )
    assert 0 < row["max_error"] < row["tolerance"] == TOL_FLOAT32
    variants = record["results"]["variants"]
    assert {v["variant"] for v in variants} == set(WRONG_VARIANTS)
    assert all(v["margin"] > 1 for v in variants)


def test_trace_rows_are_what_the_oracle_reads() -> None:
    """The trace fields the oracle relies on (a change in engine/trace.py must show up here)."""
    fields = {f.name for f in dataclasses.fields(TraceRow)}
    assert {"worker", "block", "tokens", "view", "logits", "next_token", "uniform", "banned"} <= fields
