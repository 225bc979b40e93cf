"""Hogwild attention as a Triton kernel over the paged pool (docs/ARCHITECTURE.md, "Attention").

Tiles, pieces and items are those of the step's plan (engine/layers/kernel_plan.py). One program takes one
item and one KV head: it stacks the tile's queries of that head's GQA group into one [tokens * group, d]
matrix (split over programs past 64 rows) and, piece by piece, rotates each query by minus the block's
offset in its own view, in registers, and runs an online softmax over the piece's
keys, so each key is read once for the whole tile. The partial result (running max, sum, unnormalized
output) goes to a scratch buffer, and a second kernel merges each token's partials by log-sum-exp.

This module imports triton at the top; ``engine.layers.attention`` imports it only when the backend is
chosen, because triton is optional and reads ``TRITON_INTERPRET`` when the kernels below are defined.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

import torch
import triton
import triton.language as tl
from transformers import LlamaConfig
from triton.runtime.interpreter import InterpretedFunction

from engine.layers.attention import FusedAttention
from engine.layers.kernel_plan import KernelPlan
from engine.layers.rotary import Rotary
from engine.layers.rows import RowSpec

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
# A finite start for the running max: a query may see none of an item's keys (the causal part of its own
# block), and exp2(-inf - -inf) would be NaN.
NO_SCORE = tl.constexpr(-1.0e30)
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# Sizes that change from step to step are not specialized on (Triton would compile a variant for 1 and for
# multiples of 16), so a server compiles each kernel once per model and tile block, not per step shape.
@triton.jit(do_not_specialize=["qk_scale", "tile"])
def _attend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    key_slots_ptr,
    piece_start_ptr,
    piece_len_ptr,
    piece_skip_ptr,
    piece_rot_ptr,
    rot_offset_ptr,
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
    head_offsets = kv_head.to(tl.int64) * stride_ph + d[None, :]  # head-major pools: past 2**31 when large

    m_i = tl.full([BLOCK_M], NO_SCORE, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The grid's third axis fits the largest tile; sub-tiles past this item's queries read no keys.
    first_query = tl.program_id(2) * BLOCK_M // GROUP
    any_live = tl.load(query_index_ptr + item * tile + first_query, mask=first_query < tile, other=-1) >= 0
    first_piece = tl.load(item_pieces_ptr + item)
    end_piece = tl.where(any_live, tl.load(item_pieces_ptr + item + 1), first_piece)
    for piece in range(first_piece, end_piece):
        # Each query's rotation: minus the block's offset in its own view.
        rot = tl.load(piece_rot_ptr + piece * tile + query, mask=live, other=0)
        rot_rows = rot[:, None] * DIM + d[None, :]
        cos = tl.load(cos_ptr + rot_rows, mask=q_mask, other=0.0) * qk_scale
        sin = tl.load(sin_ptr + rot_rows, mask=q_mask, other=0.0) * qk_scale
        q_piece = (q.to(tl.float32) * cos + q_partner.to(tl.float32) * sin).to(DOT_DTYPE)
        key_start = tl.load(piece_start_ptr + piece)
        key_len = tl.load(piece_len_ptr + piece)
        # Key n of the piece is visible to a query if n <= limit: it exists and is not in its future.
        first_pos = tl.load(rot_offset_ptr + rot, mask=live, other=0) + tl.load(piece_skip_ptr + piece)
        limit = tl.minimum(query_pos - first_pos, key_len - 1)
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
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The outputs of one token's BLOCK_H heads: the log-sum-exp merge of each head's partials, BLOCK_P
    partials per load. A decode step has few (token, head) rows (4 workers x 32 heads) with many partials each
    (one per item of a long block): one program per row and a tile of partials per load keeps the GPU busy,
    where a loop of one partial per iteration would be serial."""
    token = tl.program_id(0)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = head < HEADS
    first = tl.load(part_start_ptr + token).to(tl.int64)  # offsets may pass 2**31
    count = tl.load(part_start_ptr + token + 1) - first
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    m_run = tl.full([BLOCK_H], NO_SCORE, tl.float32)
    l_run = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for i in range(0, count, BLOCK_P):
        live = head_ok[:, None] & (i + p < count)[None, :]
        stat = (first + i + p)[None, :] * HEADS + head[:, None]  # [BLOCK_H, BLOCK_P]
        m_part = tl.load(part_max_ptr + stat, mask=live, other=NO_SCORE)
        m_new = tl.maximum(m_run, tl.max(m_part, 1))
        alpha = tl.exp2(m_run - m_new)
        beta = tl.exp2(m_part - m_new[:, None])
        l_run = l_run * alpha + tl.sum(tl.load(part_sum_ptr + stat, mask=live, other=0.0) * beta, 1)
        out_mask = live[:, :, None] & d_ok[None, None, :]
        out = tl.load(part_out_ptr + stat[:, :, None] * DIM + d[None, None, :], mask=out_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.sum(out * beta[:, :, None], 1)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)[:, None]  # a pad token (CUDA graphs) has no partials: 0
    out_rows = out_ptr + token.to(tl.int64) * stride_ot + head[:, None] * stride_oh
    tl.store(out_rows + d[None, :], out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & d_ok[None, :])


def attend_meta(
    rows: int, heads: int, group: int, dim: int, dot_dtype: torch.dtype, stages: int = 3
) -> dict[str, Any]:
    """The attend kernel's constants, warps and pipeline stages for query tiles of ``rows`` rows (tokens x
    GQA group)."""
    block_d = max(16, triton.next_power_of_2(dim))
    # Query rows per program: tl.dot needs 16; the cap keeps the accumulator and query tiles in registers
    # (`python -m bench kernels` reports the registers and spills of each head_dim on sm_90).
    max_rows = (4096 if dot_dtype == torch.float32 else 8192) // block_d
    block_m = min(64, max_rows, max(16, triton.next_power_of_2(rows)))
    return {
        "HEADS": heads,
        "GROUP": group,
        "DIM": dim,
        "BLOCK_M": block_m,
        "BLOCK_N": 64 if block_d <= 128 else 32,
        "BLOCK_D": block_d,
        "DOT_DTYPE": TL_DTYPES[dot_dtype],
        "PRECISION": "ieee" if dot_dtype == torch.float32 else "tf32",
        "num_warps": 8 if block_m * block_d >= 4096 else 4,
        "num_stages": stages,
    }


def merge_meta(heads: int, dim: int, merge_heads: int) -> dict[str, Any]:
    """The merge kernel's constants and warps for ``merge_heads`` heads per program."""
    block_d = max(16, triton.next_power_of_2(dim))
    return {
        "HEADS": heads,
        "DIM": dim,
        "BLOCK_H": merge_heads,
        "BLOCK_P": 32 if block_d <= 128 else 16,
        "BLOCK_D": block_d,
        "num_warps": 4,
    }


class TritonAttention(FusedAttention):
    """The fused GPU path; any head_dim, GQA ratio and dtype (float32 dots run in full precision).

    A step's keys make about ``items`` items (at least ``chunk`` keys each): with a model's 8 KV heads, 32
    items are about two programs per SM of an H100. FlashAttention's decode splits the same way (a few splits
    per head, long loops per program); the shorter the items, the more partials the merge reads and writes
    (float32, one per query row and item) and the less of each program's loop the loads overlap.
    ``stages``: Triton's software pipelining of the attend loop. At 3 (Triton's default) the K and V tiles of
    the next key block load while the current one is scored, through one shared-memory buffer each; at 5
    they have two (``python -m bench kernels`` shows the buffers and registers each takes).
    ``merge_heads``: heads per program of the merge. One on a GPU, for parallelism; every head under the
    interpreter, which runs programs one after another at a cost per program."""

    def __init__(
        self,
        chunk: int = 256,
        tile_tokens: int = 64,
        items: int | None = 32,
        stages: int = 3,
        merge_heads: int | None = None,
    ):
        super().__init__(chunk, tile_tokens, items)
        self.stages = stages
        if merge_heads is not None and merge_heads & (merge_heads - 1):
            raise ValueError(f"merge_heads must be a power of 2, not {merge_heads}")
        self.merge_heads = merge_heads

    def __call__(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: KernelPlan, scale: float
    ) -> torch.Tensor:
        heads, dim = q.shape[1], q.shape[2]
        kv_heads = k_pool.shape[1]
        assert k_pool.stride() == v_pool.stride() and q.stride(2) == k_pool.stride(2) == 1
        group = heads // kv_heads
        part_max = torch.empty(plan.parts, heads, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_out = torch.empty(plan.parts, heads, dim, dtype=torch.float32, device=q.device)
        # Triton's interpreter has no bfloat16 tl.dot (triton-lang/triton#11584): there, it dots in float32.
        interpreted = isinstance(_attend_kernel, InterpretedFunction)
        dot_dtype = torch.float32 if interpreted and q.dtype == torch.bfloat16 else q.dtype
        meta = attend_meta(plan.tile * group, heads, group, dim, dot_dtype, self.stages)
        grid = (len(plan.item_pieces) - 1, kv_heads, triton.cdiv(plan.tile * group, meta["BLOCK_M"]))
        _attend_kernel[grid](
            q,
            k_pool,
            v_pool,
            plan.key_slots,
            plan.piece_start,
            plan.piece_len,
            plan.piece_skip,
            plan.piece_rot,
            plan.rot_offset,
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
            **meta,
        )
        out = torch.empty_like(q)
        merge_heads = self.merge_heads or (triton.next_power_of_2(heads) if interpreted else 1)
        _merge_kernel[(plan.tokens, triton.cdiv(heads, merge_heads))](
            plan.part_start,
            part_max,
            part_sum,
            part_out,
            out,
            out.stride(0),
            out.stride(1),
            **merge_meta(heads, dim, merge_heads),
        )
        return out


@cache
def kernel_runs(device: torch.device, dtype: torch.dtype = torch.float16) -> bool:
    """Whether the kernels build and run on ``device`` in ``dtype``: Triton compiles a small C launcher on
    first use, which needs a C compiler and Python's headers at run time (a CUDA runtime image may have
    neither), and GPUs before Ampere have no bfloat16 dots. The attention and two of the fused ops run once.
    Any failure logs one warning; the caller then keeps the torch paths."""
    from engine.layers.triton_ops import TritonOps

    try:
        kernel, ops = TritonAttention(), TritonOps()
        rotary = Rotary(LlamaConfig(head_dim=16), 16, device)
        plan = kernel.plan([RowSpec(0, 2, [(torch.arange(4), 0)])], rotary, dtype)
        q = torch.randn(2, 2, 16, device=device, dtype=dtype)
        k_pool, v_pool = torch.randn(2, 4, 1, 16, device=device, dtype=dtype)
        outputs = [kernel(q, k_pool, v_pool, plan, 0.25), ops.silu_mul(q.view(2, 32))]
        outputs += ops.add_rms_norm(q, q, torch.ones(16, device=device, dtype=dtype), 1e-6)
        return all(bool(torch.isfinite(out).all()) for out in outputs)
    except Exception as exc:  # the kernels are an optimization: any failure keeps the torch paths
        log.warning(
            "the Triton kernels do not run here (%s: %s); using the vectorized torch attention. "
            "Triton needs a C compiler and Python's headers at run time (gcc, python3-dev).",
            type(exc).__name__,
            (str(exc).strip().splitlines() or [""])[-1],
        )
        return False
