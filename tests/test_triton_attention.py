"""The Triton kernel against the reference attention (docs/ARCHITECTURE.md, "Attention").

The kernels run under Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, which tests/conftest.py sets
before triton is first imported); with ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the
compiled kernels on the GPU. Steps are random (tests/attention_cases.py).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytest.importorskip("triton")  # the dev extra installs it
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

import engine.step_graphs as step_graphs  # noqa: E402
from engine import Engine  # noqa: E402
from engine.layers import backends  # noqa: E402
from engine.layers.backends import ATTENTION_BACKENDS, resolve_attention  # noqa: E402
from engine.layers.kernel_plan import CHUNK_STEP, PlanSize  # noqa: E402
from engine.layers.triton_attention import TritonAttention, kernel_runs  # noqa: E402
from engine.step_graphs import StepGraphs  # noqa: E402
from tests.attention_cases import CASES, PAGE_SIZE, compare, random_step, rotary_for  # noqa: E402
from tests.models import tiny_model  # noqa: E402
from tests.test_oracle import check_against_reference  # noqa: E402

# Small chunks and tiles, so that split-K and query tiling both happen.
KERNEL = TritonAttention(chunk=16, tile_tokens=8, items=None)


@pytest.mark.parametrize("merge_heads", [1, 4], ids=["merge-1-head", "merge-4-heads"])
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads", "workers", "prefill"), CASES)
def test_kernel_matches_reference_in_float32(
    head_dim: int, heads: int, kv_heads: int, workers: list[int], prefill: int, merge_heads: int
) -> None:
    """The merge takes one head per program on a GPU and several under the interpreter: both, and a head
    count that is not a multiple of 4."""
    gen = torch.Generator().manual_seed(head_dim + sum(workers))
    rows = random_step(workers, gen, prefill)
    kernel = TritonAttention(chunk=16, tile_tokens=8, items=None, merge_heads=merge_heads)
    compare(kernel, rows, heads, kv_heads, head_dim, torch.float32, gen, DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference_in_half_precision(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    compare(KERNEL, random_step([3, 1], gen, prefill=12), 8, 2, 80, dtype, gen, DEVICE)


def test_every_block_is_read_once_per_job() -> None:
    """A job's rows make one tile over every block several of them see (in the combined layout, all of
    them: common, the headers and every worker's step), so each block's keys are in the plan once."""
    gen = torch.Generator().manual_seed(0)
    rows = random_step([4, 2], gen, multi_token=False)
    plan = TritonAttention(chunk=10**6).host_plan(rows)
    blocks = {(s.data_ptr(), len(s)): len(s) for r in rows for s, _ in r.blocks if len(s)}
    assert len(plan.key_slots) == sum(blocks.values())
    assert len(plan.piece_start) == len(blocks)
    queries = (plan.query_index >= 0).sum(1).tolist()
    assert sorted(q for q in queries if q > 1) == [2, 4]  # one item per job, and one per private block


def test_items_lengthen_chunks_to_the_step() -> None:
    """With ``items``, a step's keys make about that many items of whole key blocks of the kernel, however
    many keys it has; the outputs do not change."""
    gen = torch.Generator().manual_seed(5)
    rows = random_step([4, 3], gen, prefill=30)
    keys = sum({(s.data_ptr(), len(s)): len(s) for r in rows for s, _ in r.blocks}.values())
    kernel = TritonAttention(chunk=16, tile_tokens=8, items=3)
    plan = kernel.host_plan(rows)
    chunk = -(-keys // (3 * CHUNK_STEP)) * CHUNK_STEP
    short = KERNEL.host_plan(rows)
    assert chunk > 16 and int(plan.piece_len.max()) <= chunk
    assert len(plan.piece_len) < len(short.piece_len) and len(plan.item_pieces) < len(short.item_pieces)
    compare(kernel, rows, 8, 2, 64, torch.float32, gen, DEVICE)


def test_auto_picks_triton_on_cuda_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, torch.float32, 64, cpu_kernels=False) == "vectorized"
    monkeypatch.setattr(backends, "_triton_runs", lambda device, dtype: True)
    assert resolve_attention("auto", cuda, torch.bfloat16, 64) == "triton"
    monkeypatch.setattr(backends, "_triton_runs", lambda device, dtype: False)  # no compiler, say
    assert resolve_attention("auto", cuda, torch.bfloat16, 64) == "vectorized"
    assert resolve_attention("reference", cuda, torch.bfloat16, 64) == "reference"
    assert isinstance(ATTENTION_BACKENDS["triton"](), TritonAttention)


def test_engine_with_triton_matches_reference(tok: Any) -> None:
    """Eager steps, q/k norms in the fused epilogue (the static-graph test below covers llama on the CPU)."""
    model = tiny_model("qwen3-qknorm", tok)
    torch.nn.Module.to(model, DEVICE)  # the reference replays on the engine's device
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=4096, attention="triton", prefill_chunk=96)
    job = eng.generate("Add 2 and 3.", workers=3, max_tokens=16, finisher=False, trace=True)
    assert check_against_reference(model, job) >= 12 * 3
    assert any(s.rollovers for s in job.trace)  # headers: rows of several tokens


def test_padded_plan_gives_the_same_outputs() -> None:
    """A CUDA graph's plan: pad keys, pieces, rotations, items, partials and query columns change nothing,
    and pad tokens (rows past the step's tokens) come out as zeros."""
    gen = torch.Generator().manual_seed(3)
    rows = random_step([3, 2], gen, prefill=10)
    tokens = sum(r.num_tokens for r in rows)
    plan = KERNEL.host_plan(rows)
    have = plan.size
    size = PlanSize(
        have.keys + 50,
        have.pieces + 7,
        have.rots + 3,
        have.items + 9,
        have.parts + 30,
        tokens + 5,
        have.tile * 2,
    )
    padded = plan.padded(size)
    assert padded.size == size
    q = torch.randn(size.tokens, 8, 64, generator=gen).to(DEVICE)
    k_pool, v_pool = torch.randn(2, 1024 * PAGE_SIZE, 2, 64, generator=gen).to(DEVICE)
    rotary = rotary_for(64, DEVICE)

    def run(p: Any) -> torch.Tensor:
        return KERNEL(q, k_pool, v_pool, p.placed(rotary), 0.125)

    expected, actual = run(plan), run(padded)
    torch.testing.assert_close(actual[:tokens], expected[:tokens], atol=1e-6, rtol=1e-6)
    assert torch.all(actual[tokens:] == 0)


# In Triton's interpreter a family takes a minute and a half of the suite: there qwen3's q/k norms are left
# to the eager test above, and a GPU runs both.
INTERPRETED = pytest.mark.skipif(DEVICE != "cuda", reason="interpreted: the eager test covers q/k norms")


@pytest.mark.parametrize("family", ["llama-gqa4", pytest.param("qwen3-qknorm", marks=INTERPRETED)])
def test_engine_steps_from_static_graph_buffers_match_reference(
    tok: Any, family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps padded into static graph buffers (captured and replayed on CUDA; run from the same
    buffers on the CPU), with sizes small enough that growing contexts re-capture."""
    monkeypatch.setattr(
        step_graphs, "MIN_SIZE", PlanSize(keys=16, pieces=4, rots=2, items=4, parts=8, tokens=0, tile=0)
    )
    model = tiny_model(family, tok)
    torch.nn.Module.to(model, DEVICE)
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=4096, attention="triton", prefill_chunk=96)
    graphs = eng.runner.graphs = StepGraphs(eng.runner, capture=DEVICE == "cuda")
    jobs = [
        eng.submit(p, workers=w, max_tokens=16, finisher=False, trace=True)
        for p, w in [("Add 2 and 3.", 3), ("Hi", 2)]
    ]
    while not all(j.ended for j in jobs):
        eng.step()
    for job in jobs:
        assert check_against_reference(model, job) >= 12 * job.options.workers
    assert jobs[1].cached_tokens > 0  # the chat template's opening, read from the first job's pages
    assert graphs.replays >= 10  # steps whose shapes were captured before
    assert graphs.captures > len(graphs.graphs)  # some graph outgrew its sizes
    assert any(s.rollovers for s in jobs[0].trace)


@pytest.mark.skipif(DEVICE != "cuda", reason="host-device synchronisation exists only on a GPU")
def test_a_replayed_decode_step_waits_for_the_device_once(tok: Any) -> None:
    """Only reading the sampled tokens back waits for the GPU (torch's sync debug mode flags the rest)."""
    model = tiny_model("llama-gqa4", tok)
    torch.nn.Module.to(model, DEVICE)
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=4096, attention="triton")
    graphs = eng.runner.graphs
    assert graphs is not None
    job = eng.submit("Add 2 and 3.", workers=3, max_tokens=48, finisher=False, logit_bias={100: -1.0})
    syncs = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        while not job.ended:
            replays = graphs.replays
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                eng.step()
            if graphs.replays > replays:
                syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(syncs) >= 10
    assert max(syncs) == 1, syncs


def test_the_start_up_probe_runs_the_kernel(caplog: pytest.LogCaptureFixture) -> None:
    """``auto`` checks that the kernels (attention and fused ops) build and run in the engine's dtype before
    choosing them (a CUDA runtime image may lack the compiler Triton needs, an old GPU bfloat16 dots); a
    device where they cannot run gives a warning and the torch path."""
    assert kernel_runs(torch.device(DEVICE), torch.bfloat16)
    assert kernel_runs(torch.device(DEVICE), torch.float16)
    if DEVICE == "cpu":  # under the interpreter a CUDA launch fails: no CUDA here
        assert not kernel_runs(torch.device("cuda"), torch.bfloat16)
        assert "do not run here" in caplog.text
