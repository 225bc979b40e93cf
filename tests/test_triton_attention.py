"""The Triton kernel against the reference attention (DESIGN.md section 7).

The kernels run under Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, which tests/conftest.py sets
before triton is first imported); with ``TRITON_INTERPRET=0`` on a CUDA machine the same tests run the
compiled kernels on the GPU. Steps are random: pages in random order, jobs of 1 to 8 workers in the
combined layout (a shared ``common`` first block, shared headers, empty and non-empty step blocks), single-
and multi-token rows and a long prefill row, with small chunks and tiles so that split-K and query tiling
both happen.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytest.importorskip("triton")  # the dev extra installs it
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

from engine import Engine  # noqa: E402
from engine.layers.attention import ATTENTION_BACKENDS, ReferenceAttention, RowSpec, resolve_attention  # noqa: E402
from engine.layers.rotary import Rotary  # noqa: E402
from engine.layers.triton_attention import TritonAttention  # noqa: E402
from tests.models import tiny_model  # noqa: E402
from tests.test_oracle import check_against_reference  # noqa: E402

PAGE_SIZE = 4
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # absolute and relative


class Pages:
    """Hands out the pool's pages in random order, so blocks are scattered like a busy pool's."""

    def __init__(self, num_pages: int, gen: torch.Generator):
        self.free = torch.randperm(num_pages, generator=gen).tolist()

    def block(self, length: int) -> torch.Tensor:
        pages = torch.tensor([self.free.pop() for _ in range(-(-length // PAGE_SIZE))], dtype=torch.long)
        return (pages[:, None] * PAGE_SIZE + torch.arange(PAGE_SIZE)).flatten()[:length].to(DEVICE)


def random_step(
    workers: list[int], gen: torch.Generator, prefill: int = 0, multi_token: bool = True
) -> list[RowSpec]:
    """Rows of jobs with the given worker counts (combined layout), then one prefill row of ``prefill``."""
    pages = Pages(1024, gen)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    rows, start = [], 0
    for n in workers:
        common, others, own = pages.block(randint(1, 70)), pages.block(3), pages.block(4)
        tokens = [randint(1, 12) if multi_token and randint(0, 3) == 0 else 1 for _ in range(n)]
        steps = [pages.block(max(t, randint(0, 12))) for t in tokens]
        for i in range(n):
            view = [common, others, *(s for j, s in enumerate(steps) if j != i), own, steps[i]]
            offsets = torch.tensor([0, *(len(b) for b in view[:-1])]).cumsum(0).tolist()
            rows.append(RowSpec(start, tokens[i], list(zip(view, offsets, strict=True))))
            start += tokens[i]
    if prefill:
        rows.append(RowSpec(start, prefill, [(pages.block(prefill + randint(0, 20)), 0)]))
    return rows


def rotary_for(head_dim: int) -> Rotary:
    return Rotary(LlamaConfig(head_dim=head_dim), head_dim, torch.device(DEVICE))


def compare(
    rows: list[RowSpec], heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> None:
    tokens = sum(r.num_tokens for r in rows)
    q = torch.randn(tokens, heads, head_dim, generator=gen).to(DEVICE, dtype)
    k_pool, v_pool = torch.randn(2, 1024 * PAGE_SIZE, kv_heads, head_dim, generator=gen).to(DEVICE, dtype)
    rotary, scale = rotary_for(head_dim), head_dim**-0.5
    triton_attention = TritonAttention(chunk=16, tile_tokens=8)
    expected = ReferenceAttention()(q, k_pool, v_pool, ReferenceAttention().plan(rows, rotary, dtype), scale)
    actual = triton_attention(q, k_pool, v_pool, triton_attention.plan(rows, rotary, dtype), scale)
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize(
    ("head_dim", "heads", "kv_heads", "workers", "prefill"),
    [
        (64, 4, 1, [1], 0),
        (64, 8, 2, [8, 2], 0),
        (80, 10, 2, [3, 1], 20),  # a head_dim that is not a power of 2, GQA ratio 5
        (96, 3, 3, [4], 0),  # no GQA
        (128, 8, 2, [2, 5], 0),
        (64, 32, 2, [6], 0),  # GQA ratio 16: a tile's query rows span two programs
        (256, 2, 1, [2], 0),
    ],
)
def test_kernel_matches_reference_in_float32(
    head_dim: int, heads: int, kv_heads: int, workers: list[int], prefill: int
) -> None:
    gen = torch.Generator().manual_seed(head_dim + sum(workers))
    compare(random_step(workers, gen, prefill), heads, kv_heads, head_dim, torch.float32, gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference_in_half_precision(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    compare(random_step([3, 1], gen, prefill=12), 8, 2, 80, dtype, gen)


def test_shared_first_block_is_read_once_per_job() -> None:
    """A job's rows make one tile over `common`; each row's other blocks form one item of its own."""
    gen = torch.Generator().manual_seed(0)
    rows = random_step([4, 2], gen, multi_token=False)
    plan = TritonAttention(chunk=10**6).plan(rows, rotary_for(64), torch.float32)
    commons = {r.blocks[0][0].data_ptr(): len(r.blocks[0][0]) for r in rows}
    others = [len(s) for r in rows for s, _ in r.blocks[1:] if len(s)]
    assert len(plan.key_slots) == sum(commons.values()) + sum(others)
    assert len(plan.piece_start) == len(commons) + len(others)
    assert sorted((plan.query_index >= 0).sum(1).tolist()) == [1] * len(rows) + [2, 4]


def test_auto_picks_triton_on_cuda_only() -> None:
    assert resolve_attention("auto", torch.device("cpu")) == "vectorized"
    assert resolve_attention("auto", torch.device("cuda")) == "triton"
    assert resolve_attention("reference", torch.device("cuda")) == "reference"
    assert isinstance(ATTENTION_BACKENDS["triton"](), TritonAttention)


def test_engine_with_triton_matches_reference(tok: Any) -> None:
    model = tiny_model("llama-gqa4", tok)
    torch.nn.Module.to(model, DEVICE)  # the reference replays on the engine's device
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=4096, attention="triton", prefill_chunk=96)
    job = eng.generate("Add 2 and 3.", workers=3, max_tokens=16, finisher=False, trace=True)
    assert check_against_reference(model, job) >= 12 * 3
    assert any(s.rollovers for s in job.trace)  # headers: rows of several tokens
