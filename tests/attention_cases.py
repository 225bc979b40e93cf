"""Random steps for the fused attention kernels' tests: pages handed out in random order, jobs of 1 to 8
workers in the combined layout (a shared ``common`` first block, shared headers, empty and non-empty step
blocks) with here and there a block only one row sees, single- and multi-token rows and a long prefill
row."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig

from engine.layers.attention import ReferenceAttention
from engine.layers.rotary import Rotary
from engine.layers.rows import RowSpec

# (head_dim, heads, kv_heads, workers of each job, prefill row tokens)
CASES = [
    (64, 4, 1, [1], 0),
    (64, 8, 2, [8, 2], 0),
    (80, 10, 2, [3, 1], 20),  # a head_dim that is not a power of 2, GQA ratio 5
    (96, 3, 3, [4], 0),  # no GQA
    (128, 8, 2, [2, 5], 0),
    (64, 32, 2, [6], 0),  # GQA ratio 16: a tile's query rows span two GPU programs
    (256, 2, 1, [2], 0),
    (32, 4, 2, [3, 2], 8),  # the tiny test models use head_dim 16
]

PAGE_SIZE = 4
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # absolute and relative


class Pages:
    """Hands out the pool's pages in random order, so blocks are scattered like a busy pool's."""

    def __init__(self, num_pages: int, gen: torch.Generator):
        self.free = torch.randperm(num_pages, generator=gen).tolist()

    def block(self, length: int) -> torch.Tensor:
        pages = torch.tensor([self.free.pop() for _ in range(-(-length // PAGE_SIZE))], dtype=torch.long)
        return (pages[:, None] * PAGE_SIZE + torch.arange(PAGE_SIZE)).flatten()[:length]


def random_step(
    workers: list[int], gen: torch.Generator, prefill: int = 0, multi_token: bool = True
) -> list[RowSpec]:
    """Rows of jobs with the given worker counts (combined layout), then one prefill row of ``prefill``;
    their slots are host tensors, as the engine's are."""
    pages = Pages(1024, gen)

    def randint(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=gen))

    rows, start = [], 0
    for n in workers:
        common, others, own = pages.block(randint(1, 70)), pages.block(3), pages.block(4)
        tokens = [randint(1, 12) if multi_token and randint(0, 3) == 0 else 1 for _ in range(n)]
        steps = [pages.block(max(t, randint(0, 12))) for t in tokens]
        for i in range(n):
            # A block of this row alone, sometimes (as in the interleaved layout): read by the row's own tile.
            private = [pages.block(randint(1, 6))] if randint(0, 2) == 0 else []
            view = [common, others, *(s for j, s in enumerate(steps) if j != i), *private, own, steps[i]]
            offsets = torch.tensor([0, *(len(b) for b in view[:-1])]).cumsum(0).tolist()
            rows.append(RowSpec(start, tokens[i], list(zip(view, offsets, strict=True))))
            start += tokens[i]
    if prefill:
        rows.append(RowSpec(start, prefill, [(pages.block(prefill + randint(0, 20)), 0)]))
    return rows


def rotary_for(head_dim: int, device: str = "cpu") -> Rotary:
    return Rotary(LlamaConfig(head_dim=head_dim), head_dim, torch.device(device))


def compare(
    kernel: Any,
    rows: list[RowSpec],
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    device: str = "cpu",
) -> None:
    """``kernel`` (an attention backend) against ``ReferenceAttention`` on random queries and pools."""
    tokens = sum(r.num_tokens for r in rows)
    q = torch.randn(tokens, heads, head_dim, generator=gen).to(device, dtype)
    k_pool, v_pool = torch.randn(2, 1024 * PAGE_SIZE, kv_heads, head_dim, generator=gen).to(device, dtype)
    rotary, scale = rotary_for(head_dim, device), head_dim**-0.5
    expected = ReferenceAttention()(q, k_pool, v_pool, ReferenceAttention().plan(rows, rotary, dtype), scale)
    actual = kernel(q, k_pool, v_pool, kernel.plan(rows, rotary, dtype), scale)
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
