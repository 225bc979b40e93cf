"""Hogwild decode attention over the paged pool.

A row is one writer in one forward pass (a worker, or a prefill chunk). Its view is a list of blocks; keys
are stored rotated by their block-local position, the row's queries are rotated by their view position.
Attending to block b, which starts at offset o_b of the view, needs the relative rotation
``(R(p) q) . (R(o_b) k~)`` (docs/ARCHITECTURE.md, "Attention").

Four implementations share one interface (``plan`` once per step, ``__call__`` once per layer):
- ``ReferenceAttention`` walks rows and blocks in Python, rotating the query per block. Obviously right;
  for tests.
- ``VectorizedAttention`` gathers every row's keys, rotates each gathered key outside ``common`` by its
  block's offset (the gather materializes the keys anyway, and rotating keys is cheaper than scoring every
  key against B per-block queries or gathering a query per key, which is larger by the GQA ratio; keys of
  the blocks at offset 0 need no rotation at all), and runs one masked ``scaled_dot_product_attention``
  for all rows at once.
- ``TritonAttention`` (engine/layers/triton_attention.py) is the fused GPU kernel, and ``CpuAttention`` its
  C++ twin for the CPU (engine/layers/csrc/attention.cpp); both run the plan of engine/layers/kernel_plan.py,
  the Triton one through ``FusedAttention`` below. engine/layers/backends.py names them and picks ``auto``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from engine.layers.cpu_kernels import load_cpu_kernels
from engine.layers.kernel_plan import KernelPlan, build_plan
from engine.layers.rotary import Rotary, rotate
from engine.layers.rows import SHORT_ROW_TOKENS, RowSpec


@dataclass
class ReferencePlan:
    rows: list[RowSpec]
    rotary: Rotary


class ReferenceAttention:
    """Block by block, one row at a time."""

    def plan(self, rows: list[RowSpec], rotary: Rotary, dtype: torch.dtype) -> ReferencePlan:
        return ReferencePlan(rows, rotary)

    def __call__(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: ReferencePlan, scale: float
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        for row in plan.rows:
            qr = q[row.start : row.start + row.num_tokens].float()  # [T, h, d]
            positions = torch.arange(row.view_len - row.num_tokens, row.view_len, device=q.device)
            scores, values = [], []
            for slots, offset in row.blocks:
                cos, sin = plan.rotary.cos_sin(torch.tensor([-offset], device=q.device), scaled=False)
                qb = rotate(qr, cos, sin)
                slots = slots.to(q.device)
                k = k_pool[slots].float()  # [Lb, kvh, d]
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                s = torch.einsum("thd,lhd->htl", qb, k) * scale
                key_pos = offset + torch.arange(len(slots), device=q.device)
                s = s.masked_fill(key_pos[None, None, :] > positions[None, :, None], float("-inf"))
                scores.append(s)
                values.append(v_pool[slots].float().repeat_interleave(q.shape[1] // k_pool.shape[1], dim=1))
            p = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
            out[row.start : row.start + row.num_tokens] = torch.einsum(
                "htl,lhd->thd", p, torch.cat(values, dim=0)
            ).to(q.dtype)
        return out


@dataclass
class GroupPlan:
    """Rows padded to one [R, T] query batch over each row's keys: its *head* and its *tail*.

    The head is the leading blocks at view offset 0 (``common``): stored exactly as every view needs them
    and shared by all rows of a job, so it is gathered once per job ([J, Lh], padded) and scored against
    the job's stacked queries (W rows x T tokens x the GQA group). The tail (every later block) is gathered
    per row ([R, Lt], padded) and re-rotated as one slice. Attention ignores key order, so the mask carries
    each key's view position (pads: never visible) over the concatenated [Lh + Lt] scores.
    """

    query_index: torch.Tensor  # [R*T] packed token index per padded query (pads repeat a valid index)
    src: torch.Tensor  # valid entries of the padded [R*T] output ...
    dst: torch.Tensor  # ... and the packed positions they go to
    head_slots: torch.Tensor  # [J, Lh] pool slots of each job's head (pads: 0)
    tail_slots: torch.Tensor  # [R, Lt] pool slots of each row's tail (pads: 0)
    seat: torch.Tensor  # [R] each row's place j * W + w among the [J, W] stacked rows
    tail_cos: torch.Tensor  # [R, Lt, d] pure rotation by each tail key's block offset
    tail_sin: torch.Tensor
    mask: torch.Tensor  # [R, 1, T, Lh + Lt]: key view position <= query view position
    rows: int
    tokens: int
    jobs: int  # J
    width: int  # W: the most rows sharing one head


@dataclass
class VectorizedPlan:
    groups: list[GroupPlan]


NEVER = 1 << 40  # the view position of a padding key: after every query


class VectorizedAttention:
    """All rows in one (or a few) batched calls; per-step metadata is shared by every layer."""

    def plan(self, rows: list[RowSpec], rotary: Rotary, dtype: torch.dtype) -> VectorizedPlan:
        short = [r for r in rows if r.num_tokens <= SHORT_ROW_TOKENS]
        groups = [[r] for r in rows if r.num_tokens > SHORT_ROW_TOKENS]
        if short:
            groups.insert(0, short)
        return VectorizedPlan([self._plan_group(g, rotary, dtype) for g in groups])

    @staticmethod
    def _plan_group(rows: list[RowSpec], rotary: Rotary, dtype: torch.dtype) -> GroupPlan:
        """Built on the host (the rows' slots are host tensors), then moved to the device."""
        empty = torch.empty(0, dtype=torch.long)
        heads: dict[tuple[tuple[int, int], ...], int] = {}  # the head's blocks, by storage -> job
        head_slots: list[torch.Tensor] = []
        seats, counts_by_job, tails, tail_offsets, head_lens = [], [], [], [], []
        for r in rows:
            split = sum(offset == 0 for _, offset in r.blocks)  # offsets never decrease along a view
            key = tuple((s.data_ptr(), len(s)) for s, _ in r.blocks[:split])
            if key not in heads:
                heads[key] = len(head_slots)
                head_slots.append(torch.cat([s for s, _ in r.blocks[:split]]) if split else empty)
                counts_by_job.append(0)
            job = heads[key]
            seats.append((job, counts_by_job[job]))
            counts_by_job[job] += 1
            head_lens.append(len(head_slots[job]))
            tail = r.blocks[split:]
            tails.append(torch.cat([s for s, _ in tail]) if tail else empty)
            tail_offsets.append(
                torch.repeat_interleave(
                    torch.tensor([o for _, o in tail], dtype=torch.long),
                    torch.tensor([len(s) for s, _ in tail], dtype=torch.long),
                )
            )
        width = max(counts_by_job)
        heads_padded = pad_sequence(head_slots, batch_first=True)
        tail_slots = pad_sequence(tails, batch_first=True)
        device = rotary.device
        cos, sin = rotary.cos_sin(pad_sequence(tail_offsets, batch_first=True).to(device), scaled=False)
        head_len = torch.tensor(head_lens)[:, None]
        tail_len = torch.tensor([len(t) for t in tails])[:, None]
        h = torch.arange(heads_padded.shape[1])[None, :]
        t_ = torch.arange(tail_slots.shape[1])[None, :]
        key_pos = torch.cat(
            [torch.where(h < head_len, h, NEVER), torch.where(t_ < tail_len, head_len + t_, NEVER)], dim=1
        )
        num_t = max(r.num_tokens for r in rows)
        t = torch.arange(num_t)
        starts = torch.tensor([r.start for r in rows])[:, None]
        counts = torch.tensor([r.num_tokens for r in rows])[:, None]
        view_lens = torch.tensor([r.view_len for r in rows])[:, None]
        valid = t[None, :] < counts
        query_index = torch.where(valid, starts + t[None, :], starts)
        query_pos = view_lens - counts + t[None, :]
        flat_valid = valid.flatten()
        return GroupPlan(
            query_index=query_index.flatten().to(device),
            src=flat_valid.nonzero().squeeze(1).to(device),
            dst=query_index.flatten()[flat_valid].to(device),
            head_slots=heads_padded.to(device),
            tail_slots=tail_slots.to(device),
            seat=torch.tensor([j * width + w for j, w in seats], device=device),
            tail_cos=cos.to(dtype),
            tail_sin=sin.to(dtype),
            mask=(key_pos[:, None, :] <= query_pos[:, :, None])[:, None].to(device),
            rows=len(rows),
            tokens=num_t,
            jobs=len(head_slots),
            width=width,
        )

    def __call__(
        self,
        q: torch.Tensor,
        k_pool: torch.Tensor,
        v_pool: torch.Tensor,
        plan: VectorizedPlan,
        scale: float,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Writes the planned rows' outputs into ``out`` (a new tensor if None) and returns it."""
        out = torch.empty_like(q) if out is None else out
        heads, dim = q.shape[1], q.shape[2]
        for g in plan.groups:
            kh, vh = gather(k_pool, g.head_slots), gather(v_pool, g.head_slots)  # [kvh, J, Lh, d]
            kt, vt = gather(k_pool, g.tail_slots), gather(v_pool, g.tail_slots)  # [kvh, R, Lt, d]
            if kt.shape[2]:
                kt = rotate(kt, g.tail_cos, g.tail_sin)
            qg = q.index_select(0, g.query_index).view(g.rows, g.tokens, heads, dim)
            if g.tokens <= SHORT_ROW_TOKENS:
                o = decode_attention(qg, (kh, vh), (kt, vt), g, scale)
            else:  # one long row: its head is its own
                k, v = torch.cat([kh, kt], dim=2), torch.cat([vh, vt], dim=2)
                o = prefill_attention(qg, k, v, g.mask, scale)
            out.index_copy_(0, g.dst, o.reshape(g.rows * g.tokens, heads, dim).index_select(0, g.src))
        return out


def gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Keys (or values) at ``slots`` [B, L] as [kv_heads, B, L, d]: one index_select over the head-major
    storage (``pool`` is a [slots, kv_heads, d] view of it, see ModelRunner)."""
    by_head = pool.transpose(0, 1)  # [kvh, slots, d]
    return by_head.index_select(1, slots.flatten()).view(by_head.shape[0], *slots.shape, by_head.shape[2])


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """[R, T, h, d] queries over [kvh, R, L, d] keys: SDPA's flash kernel, made for many queries."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return o.transpose(1, 2)


def decode_attention(
    q: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor],
    tail: tuple[torch.Tensor, torch.Tensor],
    g: GroupPlan,
    scale: float,
) -> torch.Tensor:
    """Few queries per row: batched matmuls and one float32 softmax over head and tail scores. A KV
    head's query heads are stacked with the row's tokens (GQA shares keys), and a job's rows are stacked
    again over its shared head, which is read once per job. (On the CPU, SDPA's flash kernel with a mask
    costs ~20x this for decode shapes.)"""
    (kh, vh), (kt, vt) = head, tail
    rows, tokens, heads, dim = q.shape
    kv_heads = kh.shape[0]
    group = heads // kv_heads
    qs = q.view(rows, tokens, kv_heads, group, dim).permute(2, 0, 3, 1, 4).reshape(kv_heads, rows, -1, dim)
    seated = qs.new_zeros(kv_heads, g.jobs * g.width, group * tokens, dim)
    seated[:, g.seat] = qs
    seated = seated.view(kv_heads, g.jobs, -1, dim)  # [kvh, J, W*g*T, d]
    head_scores = torch.matmul(seated, kh.transpose(-1, -2))  # [kvh, J, W*g*T, Lh]
    lh = kh.shape[2]
    head_scores = head_scores.view(kv_heads, g.jobs * g.width, -1, lh)[:, g.seat]  # [kvh, R, g*T, Lh]
    scores = torch.cat([head_scores, torch.matmul(qs, kt.transpose(-1, -2))], dim=-1).float() * scale
    keys = scores.shape[-1]
    scores.view(kv_heads, rows, group, tokens, keys).masked_fill_(
        ~g.mask.view(1, rows, 1, tokens, keys), float("-inf")
    )
    probs = torch.softmax(scores, dim=-1).to(vh.dtype)
    head_probs = probs.new_zeros(kv_heads, g.jobs * g.width, group * tokens, lh)
    head_probs[:, g.seat] = probs[..., :lh]
    o = torch.matmul(head_probs.view(kv_heads, g.jobs, -1, lh), vh)  # [kvh, J, W*g*T, d]
    o = o.view(kv_heads, g.jobs * g.width, -1, dim)[:, g.seat] + torch.matmul(probs[..., lh:], vt)
    return o.view(kv_heads, rows, group, tokens, dim).permute(1, 3, 0, 2, 4)


@dataclass
class CpuPlan:
    kernel: KernelPlan | None  # rows of at most SHORT_ROW_TOKENS tokens
    long: VectorizedPlan | None  # prefill chunks


class CpuAttention:
    """The fused kernel on the CPU for decode rows (float32 and bfloat16); prefill chunks go to SDPA's flash
    kernel as in ``VectorizedAttention``, whose blocked matmuls suit hundreds of queries better. Pieces of
    256 keys keep a tile's scores in L1 (8 workers' 24 query rows x 1024 keys spilled and ran 2x slower)."""

    def __init__(self, chunk: int = 256, tile_tokens: int = 64):
        if not load_cpu_kernels():
            raise RuntimeError("attention='cpu' needs the C++ CPU kernels (AVX512-BF16 and a C++ compiler)")
        self.chunk, self.tile_tokens = chunk, tile_tokens
        self.vectorized = VectorizedAttention()

    def plan(self, rows: list[RowSpec], rotary: Rotary, dtype: torch.dtype) -> CpuPlan:
        short = [r for r in rows if r.num_tokens <= SHORT_ROW_TOKENS]
        long = [r for r in rows if r.num_tokens > SHORT_ROW_TOKENS]
        return CpuPlan(
            build_plan(short, self.chunk, self.tile_tokens).placed(rotary) if short else None,
            self.vectorized.plan(long, rotary, dtype) if long else None,
        )

    def __call__(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, plan: CpuPlan, scale: float
    ) -> torch.Tensor:
        out = None
        if (p := plan.kernel) is not None:  # every token of the long rows comes out as zeros here
            out = torch.ops.hogwild_cpu.attention(
                q, k_pool, v_pool, p.key_slots, p.piece_start, p.piece_len, p.piece_skip, p.piece_rot,
                p.rot_offset, p.cos, p.sin, p.item_pieces, p.query_index, p.query_pos, p.part, p.part_start,
                scale, p.parts,
            )  # fmt: skip
        if plan.long is not None:
            out = self.vectorized(q, k_pool, v_pool, plan.long, scale, out)
        assert out is not None
        return out


class FusedAttention:
    """A backend that runs one kernel plan for all rows (the Triton kernel). The model runner sends such a
    plan to the device with the step's inputs in one copy, and can replay its steps from CUDA graphs.

    ``chunk`` is about the keys of one item (split-K), at least; ``items``, if set, lengthens it so that a
    step makes about that many items. ``tile_tokens`` bounds the query tokens of one item.
    """

    def __init__(self, chunk: int = 256, tile_tokens: int = 64, items: int | None = None):
        self.chunk, self.tile_tokens, self.items = chunk, tile_tokens, items

    def host_plan(self, rows: list[RowSpec]) -> KernelPlan:
        return build_plan(rows, self.chunk, self.tile_tokens, self.items)

    def plan(self, rows: list[RowSpec], rotary: Rotary, dtype: torch.dtype) -> KernelPlan:
        return self.host_plan(rows).placed(rotary)
