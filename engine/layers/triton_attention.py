"""Hogwild attention as a Triton kernel over the paged pool (DESIGN.md sections 3 and 7).

A *tile* is up to ``tile_tokens`` query tokens that see the same keys at the same view offsets: the tokens of
one row, or, over their shared first block (``common``), the tokens of all rows of one job. A *piece* is a
run of at most ``chunk`` keys of one block, seen by one tile. An *item* is a few consecutive pieces of one
tile, about ``chunk`` keys in all. One program takes one item and one KV head: it stacks the tile's queries
of that head's GQA group into one [tokens * group, d] matrix (split over programs past 64 rows) and, piece
by piece, rotates them by minus the piece's block offset in registers (DESIGN.md section 3) and runs an
online softmax over the piece's keys, so each key is read once for the whole tile. The partial result
(running max, sum, unnormalized output) goes to a scratch buffer, and a second kernel merges each token's
partials by log-sum-exp (flash-decoding).

Why this cut:
- a job's ``common`` block, the longest of the step, is read once per job instead of once per worker, while
  each row's small blocks (headers, the other workers' steps, its own step) are read by that row alone, all
  in one program;
- a long block splits into pieces that run in parallel (split-K), which keeps the GPU busy when a step has
  only a few rows;
- a row of many tokens (a header after a rollover, a prefill chunk) is a row with several tiles, and one
  mask, *key view position <= query view position*, gives causality inside its own block.

This module imports triton at the top; ``engine.layers.attention`` imports it only when the backend is
chosen, because triton is optional and reads ``TRITON_INTERPRET`` when the kernels below are defined.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from engine.layers.attention import RowSpec
from engine.layers.rotary import Rotary

LOG2E = 1.4426950408889634
# A finite start for the running max: a query may see none of an item's keys (the causal part of its own
# block), and exp2(-inf - -inf) would be NaN.
NO_SCORE = tl.constexpr(-1.0e30)
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _attend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    key_slots_ptr,
    piece_start_ptr,
    piece_len_ptr,
    piece_pos_ptr,
    cos_ptr,
    sin_ptr,
    item_pieces_ptr,
    query_index_ptr,
    query_pos_ptr,
    part_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_out_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ps,
    stride_ph,
    tile,
    HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial attention of one item's query tile for one KV head; rows are (token, head in the group)."""
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    query = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    token = tl.load(query_index_ptr + item * tile + query, mask=query < tile, other=-1)
    live = token >= 0
    query_pos = tl.load(query_pos_ptr + item * tile + query, mask=live, other=-1)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    partner = tl.where(d < DIM // 2, d + DIM // 2, d - DIM // 2)  # rotate_half's source; its sign is in sin
    q_mask = live[:, None] & d_ok[None, :]
    q_rows = q_ptr + token.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)
    q_partner = tl.load(q_rows + partner[None, :], mask=q_mask, other=0.0)
    head_offsets = kv_head * stride_ph + d[None, :]

    m_i = tl.full([BLOCK_M], NO_SCORE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The grid's third axis fits the largest tile; sub-tiles past this item's queries read no keys.
    first_query = tl.program_id(2) * BLOCK_M // GROUP
    any_live = tl.load(query_index_ptr + item * tile + first_query, mask=first_query < tile, other=-1) >= 0
    first_piece = tl.load(item_pieces_ptr + item)
    end_piece = tl.where(any_live, tl.load(item_pieces_ptr + item + 1), first_piece)
    for piece in range(first_piece, end_piece):
        cos = tl.load(cos_ptr + piece * DIM + d, mask=d_ok, other=0.0) * qk_scale
        sin = tl.load(sin_ptr + piece * DIM + d, mask=d_ok, other=0.0) * qk_scale
        q_piece = (q.to(tl.float32) * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]).to(DOT_DTYPE)
        key_start = tl.load(piece_start_ptr + piece)
        key_len = tl.load(piece_len_ptr + piece)
        # Key n of the piece is visible to a query if n <= limit: it exists and is not in its future.
        limit = tl.minimum(query_pos - tl.load(piece_pos_ptr + piece), key_len - 1)
        for n0 in range(0, key_len, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < key_len
            slot = tl.load(key_slots_ptr + key_start + n, mask=n_ok, other=0).to(tl.int64)
            kv_offsets = slot[:, None] * stride_ps + head_offsets
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
            s = tl.dot(q_piece, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION)
            s = tl.where(n[None, :] <= limit[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

    stat = tl.load(part_ptr + item * tile + query, mask=live, other=0).to(tl.int64) * HEADS + head
    tl.store(part_max_ptr + stat, m_i, mask=live)
    tl.store(part_sum_ptr + stat, l_i, mask=live)
    tl.store(part_out_ptr + stat[:, None] * DIM + d[None, :], acc, mask=q_mask)


@triton.jit
def _merge_kernel(
    part_start_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_out_ptr,
    out_ptr,
    stride_ot,
    stride_oh,
    rows_total,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Outputs of BLOCK_R (token, head) rows: the log-sum-exp merge of each row's partials."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < rows_total
    token = rows // HEADS
    head = rows % HEADS
    d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (d < DIM)[None, :]
    first = tl.load(part_start_ptr + token, mask=row_ok, other=0).to(tl.int64)  # offsets may pass 2**31
    count = tl.load(part_start_ptr + token + 1, mask=row_ok, other=0) - first
    m_run = tl.full([BLOCK_R], NO_SCORE, tl.float32)
    l_run = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for i in range(0, tl.max(count, 0)):
        live = i < count
        stat = (first + i) * HEADS + head
        m_part = tl.load(part_max_ptr + stat, mask=live, other=NO_SCORE)
        m_new = tl.maximum(m_run, m_part)
        alpha = tl.exp2(m_run - m_new)
        beta = tl.exp2(m_part - m_new)
        l_run = l_run * alpha + tl.load(part_sum_ptr + stat, mask=live, other=0.0) * beta
        out = tl.load(part_out_ptr + stat[:, None] * DIM + d[None, :], mask=live[:, None] & mask, other=0.0)
        acc = acc * alpha[:, None] + out * beta[:, None]
        m_run = m_new
    out = acc / tl.where(row_ok, l_run, 1.0)[:, None]
    out_rows = out_ptr + token.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(out_rows + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass
class TritonPlan:
    """Per-step metadata shared by every layer; all tensors int32 on the pool's device unless noted."""

    key_slots: torch.Tensor  # [keys] pool slots of every key run, runs back to back
    piece_start: torch.Tensor  # [pieces] the piece's first key in key_slots
    piece_len: torch.Tensor  # [pieces]
    piece_pos: torch.Tensor  # [pieces] view position of the piece's first key
    cos: torch.Tensor  # [pieces, d] float32: rotation of the queries by minus the block's offset ...
    sin: torch.Tensor  # ... with the sign of rotate_half folded into sin
    item_pieces: torch.Tensor  # [items + 1] item i attends pieces item_pieces[i] .. item_pieces[i+1]
    query_index: torch.Tensor  # [items, tile] packed token of each query (pads: -1)
    query_pos: torch.Tensor  # [items, tile] view position of each query
    part: torch.Tensor  # [items, tile] scratch row of each (item, query) partial
    part_start: torch.Tensor  # [tokens + 1] token t's partials are rows part_start[t] .. part_start[t+1]
    tokens: int
    parts: int
    tile: int


class _Layout:
    """The step's key runs, query tiles, pieces and items, collected in Python lists: a few hundred rows
    cost less this way than in many small tensor ops."""

    def __init__(self, chunk: int, tile_tokens: int):
        self.chunk, self.tile_tokens = chunk, tile_tokens
        self.runs: list[torch.Tensor] = []
        self.keys = 0
        self.tile_index: list[list[int]] = []  # packed token of each query
        self.tile_pos: list[list[int]] = []  # view position of each query
        # (first key, keys, block offset, view position of the first key)
        self.pieces: list[tuple[int, int, int, int]] = []
        self.item_pieces: list[int] = []  # first piece of each item
        self.item_tile: list[int] = []

    def tiles(self, index: list[int], pos: list[int]) -> list[int]:
        """Cuts queries into tiles; returns their ids."""
        first = len(self.tile_index)
        for i in range(0, len(index), self.tile_tokens):
            self.tile_index.append(index[i : i + self.tile_tokens])
            self.tile_pos.append(pos[i : i + self.tile_tokens])
        return list(range(first, len(self.tile_index)))

    def attend(self, blocks: list[tuple[torch.Tensor, int]], tile_ids: list[int]) -> None:
        """Adds the blocks' keys once and lets each tile attend them, in items of about ``chunk`` keys."""
        runs = []
        for slots, offset in blocks:
            if len(slots):
                self.runs.append(slots)
                runs.append((self.keys, len(slots), offset))
                self.keys += len(slots)
        for tile in tile_ids:
            last = max(self.tile_pos[tile])
            item_keys = self.chunk  # the first piece opens an item
            for first, length, offset in runs:
                # Pieces that start after the tile's last query (a long row's own future) are left out.
                for skip in range(0, min(length, last - offset + 1), self.chunk):
                    if item_keys >= self.chunk:
                        self.item_pieces.append(len(self.pieces))
                        self.item_tile.append(tile)
                        item_keys = 0
                    keys = min(self.chunk, length - skip)
                    self.pieces.append((first + skip, keys, offset, offset + skip))
                    item_keys += keys


class TritonAttention:
    """The fused GPU path; any head_dim, GQA ratio and dtype (float32 dots run in full precision).

    ``chunk`` is about the keys of one item (split-K), ``tile_tokens`` bounds the query tokens of one item.
    """

    def __init__(self, chunk: int = 256, tile_tokens: int = 64):
        self.chunk, self.tile_tokens = chunk, tile_tokens

    def plan(self, rows: list[RowSpec], rotary: Rotary, dtype: torch.dtype) -> TritonPlan:
        device = rows[0].blocks[0][0].device
        layout = _Layout(self.chunk, self.tile_tokens)
        # Rows whose first block is the same tensor (the job's `common`, cached by the Block) share it.
        groups: dict[tuple[int, int, int], list[RowSpec]] = {}
        for row in rows:
            slots, offset = row.blocks[0]
            groups.setdefault((slots.data_ptr(), len(slots), offset), []).append(row)
        for group in groups.values():
            index = [list(range(r.start, r.start + r.num_tokens)) for r in group]
            pos = [list(range(r.view_len - r.num_tokens, r.view_len)) for r in group]
            shared = layout.tiles(list(chain(*index)), list(chain(*pos)))
            layout.attend(group[0].blocks[:1], shared)
            for row, row_index, row_pos in zip(group, index, pos, strict=True):
                layout.attend(row.blocks[1:], shared if len(group) == 1 else layout.tiles(row_index, row_pos))

        width = max(len(t) for t in layout.tile_index)
        pad = [[-1] * (width - len(t)) for t in layout.tile_index]
        item_tile = torch.tensor(layout.item_tile)
        query_index = torch.tensor([t + p for t, p in zip(layout.tile_index, pad, strict=True)])[item_tile]
        query_pos = torch.tensor([t + p for t, p in zip(layout.tile_pos, pad, strict=True)])[item_tile]
        piece_first, piece_keys, piece_offset, piece_pos = torch.tensor(layout.pieces).unbind(1)

        # Number the partials token by token, so that each token's are contiguous for the merge.
        live = query_index >= 0
        owners = query_index[live]
        rank = torch.empty_like(owners)
        rank[torch.argsort(owners, stable=True)] = torch.arange(len(owners))
        part = torch.full_like(query_index, -1)
        part[live] = rank
        tokens = max(r.start + r.num_tokens for r in rows)
        part_start = torch.bincount(owners, minlength=tokens).cumsum(0)
        part_start = torch.cat([torch.zeros(1, dtype=torch.long), part_start])

        cos, sin = rotary.cos_sin(-piece_offset.to(device), scaled=False)
        half = cos.shape[-1] // 2
        sign = torch.cat([-torch.ones(half, device=device), torch.ones(half, device=device)])

        def dev(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, dtype=torch.int32)

        return TritonPlan(
            key_slots=dev(torch.cat(layout.runs)),
            piece_start=dev(piece_first),
            piece_len=dev(piece_keys),
            piece_pos=dev(piece_pos),
            cos=cos,
            sin=sin * sign,
            item_pieces=dev(torch.tensor([*layout.item_pieces, len(layout.pieces)])),
            query_index=dev(query_index),
            query_pos=dev(query_pos),
            part=dev(part),
            part_start=dev(part_start),
            tokens=tokens,
            parts=len(owners),
            tile=query_index.shape[1],
        )

    def __call__(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: TritonPlan, scale: float
    ) -> torch.Tensor:
        heads, dim = q.shape[1], q.shape[2]
        kv_heads = k_pool.shape[1]
        assert k_pool.stride() == v_pool.stride() and q.stride(2) == k_pool.stride(2) == 1
        group = heads // kv_heads
        part_max = torch.empty(plan.parts, heads, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_out = torch.empty(plan.parts, heads, dim, dtype=torch.float32, device=q.device)
        block_d = max(16, triton.next_power_of_2(dim))
        # Triton's interpreter has no bfloat16 tl.dot (triton-lang/triton#11584): there, it dots in float32.
        interpreted = isinstance(_attend_kernel, InterpretedFunction)
        dot_dtype = torch.float32 if interpreted and q.dtype == torch.bfloat16 else q.dtype
        # Query rows per program: tl.dot needs 16; the cap keeps the accumulator and query tiles in registers
        # (ptxas on sm_90 reports no spills for 16-bit inputs up to head_dim 256).
        max_rows = (4096 if dot_dtype == torch.float32 else 8192) // block_d
        block_m = min(64, max_rows, max(16, triton.next_power_of_2(plan.tile * group)))
        grid = (len(plan.item_pieces) - 1, kv_heads, triton.cdiv(plan.tile * group, block_m))
        _attend_kernel[grid](
            q,
            k_pool,
            v_pool,
            plan.key_slots,
            plan.piece_start,
            plan.piece_len,
            plan.piece_pos,
            plan.cos,
            plan.sin,
            plan.item_pieces,
            plan.query_index,
            plan.query_pos,
            plan.part,
            part_max,
            part_sum,
            part_out,
            scale * LOG2E,
            q.stride(0),
            q.stride(1),
            k_pool.stride(0),
            k_pool.stride(1),
            plan.tile,
            HEADS=heads,
            GROUP=group,
            DIM=dim,
            BLOCK_M=block_m,
            BLOCK_N=64 if block_d <= 128 else 32,
            BLOCK_D=block_d,
            DOT_DTYPE=TL_DTYPES[dot_dtype],
            PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",
            num_warps=8 if block_m * block_d >= 4096 else 4,
        )
        out = torch.empty_like(q)
        merge_rows = plan.tokens * heads
        block_r = 32 if block_d <= 128 else 16
        _merge_kernel[(triton.cdiv(merge_rows, block_r),)](
            plan.part_start,
            part_max,
            part_sum,
            part_out,
            out,
            out.stride(0),
            out.stride(1),
            merge_rows,
            HEADS=heads,
            DIM=dim,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
        )
        return out
