"""The engine against the independent reference (tests/reference_hogwild.py, DESIGN.md section 5).

Each job is replayed from its trace through transformers' own forward with a naive re-rotating cache; at
every decode step each worker's logits must match the engine's and the emitted token must be their argmax.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import Engine
from engine.layers.cpu_kernels import load_cpu_kernels
from tests.models import FAMILIES, tiny_model
from tests.reference_hogwild import replay

TOL = 1e-4


def check_against_reference(model: Any, job: Any) -> int:
    """Returns the number of worker rows compared."""
    compared = 0
    for step, ref_rows in zip(job.trace, replay(model, job.trace), strict=False):
        for row, ref in zip(step.rows, ref_rows, strict=False):
            if row.logits is None:
                continue
            assert ref is not None
            diff = (row.logits - ref).abs().max().item()
            assert diff <= TOL, f"worker {row.worker} view {row.view}: max abs diff {diff}"
            assert row.next_token == int(ref.argmax()), f"worker {row.worker}: token is not the argmax"
            compared += 1
    return compared


CPU_KERNEL = pytest.param("cpu", marks=pytest.mark.skipif(not load_cpu_kernels(), reason="no CPU kernels"))


@pytest.mark.parametrize("attention", ["vectorized", "reference", CPU_KERNEL])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("layout", ["combined", "interleaved", "contiguous"])
@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_engine_matches_reference(tok: Any, family: str, layout: str, workers: int, attention: str) -> None:
    model = tiny_model(family, tok)
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=4096, attention=attention, prefill_chunk=96)
    job = eng.generate(
        "Add 2 and 3.", workers=workers, layout=layout, max_tokens=40, finisher=False, trace=True
    )
    assert check_against_reference(model, job) >= 20 * workers
    if layout != "contiguous":
        rollovers = [r.worker for s in job.trace for r in s.rollovers]
        assert all(rollovers.count(w) >= 3 for w in range(workers)), rollovers


def test_several_jobs_at_once_match_the_reference(tok: Any) -> None:
    """Rows of different jobs share forward passes; each job's trace still replays exactly."""
    model = tiny_model("qwen3-qknorm", tok)
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=4096)
    jobs = [
        eng.submit(f"Job {i}", workers=w, layout=lay, max_tokens=30, finisher=False, trace=True)
        for i, (w, lay) in enumerate(
            [(2, "combined"), (3, "interleaved"), (1, "contiguous"), (5, "combined")]
        )
    ]
    while not all(j.ended for j in jobs):
        eng.step()
    for job in jobs:
        assert check_against_reference(model, job) > 0
    torch.testing.assert_close(torch.tensor(eng.free_pages), torch.tensor(eng.total_pages))
