"""Runs one forward pass for the rows of all jobs and owns the K/V tensors of the pool.

A step is planned on the host (token ids, slots, positions, the attention's plan) and its int32 tensors go
to the device in one copy that does not block the host, so a GPU step waits on the host only where the
sampled tokens are read back. Steps of the fused kernel can be replayed from CUDA graphs
(engine/step_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.block_manager import Block, PageHolder, PagePool
from engine.layers.attention import ATTENTION_BACKENDS, Attention, RowSpec
from engine.layers.kernel_plan import FusedAttention, KernelPlan, PlanSize
from engine.layers.ops import CpuOps, TorchOps, triton_ops
from engine.layers.rotary import Rotary, rotate
from engine.models.llama import LlamaModel, StepInputs


@dataclass
class Row:
    """One writer in a forward pass: ``tokens`` are appended to ``block``, the last block of ``view``."""

    tokens: list[int]
    block: Block
    view: list[Block]
    want_logits: bool


@dataclass
class StepBatch:
    """A step's inputs as int32 tensors: on the host when planned, on the device once sent."""

    ids: torch.Tensor  # [N] the rows' new tokens, packed row after row
    write_slots: torch.Tensor  # [N] pool slot of each new token
    q_pos: torch.Tensor  # [N] view position of each query
    k_pos: torch.Tensor  # [N] block-local position of each new key
    last: torch.Tensor  # [R] packed index of each token whose logits are wanted
    plan: Any  # the attention's plan; a KernelPlan is sent with the tensors above

    @property
    def tensors(self) -> list[torch.Tensor]:
        own = [self.ids, self.write_slots, self.q_pos, self.k_pos, self.last]
        return own + self.plan.tensors if isinstance(self.plan, KernelPlan) else own

    def with_tensors(self, tensors: list[torch.Tensor]) -> StepBatch:
        ids, write_slots, q_pos, k_pos, last, *rest = tensors
        plan = self.plan.with_tensors(rest) if isinstance(self.plan, KernelPlan) else self.plan
        return StepBatch(ids, write_slots, q_pos, k_pos, last, plan)

    def padded(self, size: PlanSize, spare_slot: int) -> StepBatch:
        """The batch (with a KernelPlan) grown to a CUDA graph's sizes: ``size.tokens`` tokens and as many
        ``last`` entries, whose pads write to the spare slot, which nothing reads, and the plan padded."""

        def pad(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([x, x.new_full((size.tokens - len(x),), value)])

        return StepBatch(
            ids=pad(self.ids, 0),
            write_slots=pad(self.write_slots, spare_slot),
            q_pos=pad(self.q_pos, 0),
            k_pos=pad(self.k_pos, 0),
            last=pad(self.last, 0),
            plan=self.plan.padded(size),
        )


ALIGN = 4  # int32s: 16 bytes


class Staging:
    """Sends host int32 tensors to the device in one copy. On CUDA they are packed into a pinned buffer and
    copied without blocking the host; the buffer is refilled only after its last copy has run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host: torch.Tensor | None = None
        self.copied = torch.cuda.Event() if device.type == "cuda" else None

    @staticmethod
    def spans(tensors: list[torch.Tensor]) -> list[int]:
        """Each tensor's room in the packed buffer: its size rounded up to 16 bytes, so that every tensor
        starts aligned (Triton compiles a kernel variant per alignment of its pointer arguments)."""
        return [-(-t.numel() // ALIGN) * ALIGN for t in tensors]

    def send(self, tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The tensors on the device, as views of ``out`` (a new buffer if None; on the CPU, themselves)."""
        if out is None and self.device.type == "cpu":
            return tensors
        spans = self.spans(tensors)
        total = sum(spans)
        if out is None:
            out = torch.empty(total, dtype=torch.int32, device=self.device)
        if self.copied is None:
            host = out
        else:
            if self.host is None or len(self.host) < total:
                self.host = torch.empty(max(total, 1 << 16), dtype=torch.int32, pin_memory=True)
            self.copied.synchronize()
            host = self.host
        for t, room in zip(tensors, host[:total].split(spans), strict=True):
            room[: t.numel()] = t.flatten()
        if self.copied is not None:
            out[:total].copy_(host[:total], non_blocking=True)
            self.copied.record()
        views = out[:total].split(spans)
        return [v[: t.numel()].view(t.shape) for v, t in zip(views, tensors, strict=True)]


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        rotary: Rotary,
        pool: PagePool,
        attention: str,
        dtype: torch.dtype,
        cuda_graphs: bool = False,
        fused_ops: bool = True,
    ):
        shape = model.shape
        self.model, self.rotary, self.pool, self.dtype = model, rotary, pool, dtype
        self.device = rotary.device
        self.attention: Attention = ATTENTION_BACKENDS[attention]()
        # The small ops fused as the attention is: by Triton with Triton, by the C++ kernels with C++.
        self.ops = TorchOps()
        if fused_ops and attention in ("triton", "cpu"):
            self.ops = triton_ops() if attention == "triton" else CpuOps()
        # One slot past the pages, which no block owns: the pad tokens of a CUDA graph write their K/V there.
        self.spare_slot = pool.num_pages * pool.page_size
        # Stored head-major, [layers, kv_heads, slots, d], seen by everyone as [layers, slots, kv_heads, d]:
        # a gather of one head's keys then reads 2*d-byte runs into [kv_heads, keys, d], the layout the
        # attention matmuls take without a transposing copy (on the CPU that copy cost more than the matmul).
        size = (shape.num_layers, shape.num_kv_heads, self.spare_slot + 1, shape.head_dim)
        self.k_pool = torch.zeros(size, dtype=dtype, device=self.device).transpose(1, 2)
        self.v_pool = torch.zeros(size, dtype=dtype, device=self.device).transpose(1, 2)
        self.staging = Staging(self.device)
        self.graphs = None
        if cuda_graphs and isinstance(self.attention, FusedAttention):
            from engine.step_graphs import StepGraphs

            self.graphs = StepGraphs(self)

    @torch.inference_mode()
    def run(self, rows: list[Row], write_slots: list[torch.Tensor]) -> torch.Tensor:
        """Logits [rows with want_logits, vocab] at each such row's last token.

        Every row's block has already been extended by its tokens (``write_slots`` are their slots), so the
        views' lengths include this step's tokens of all rows.
        """
        batch = self.plan(rows, write_slots)
        hidden = self.graphs.run(batch) if self.graphs is not None else None
        if hidden is None:
            hidden = self.forward(batch.with_tensors(self.staging.send(batch.tensors)))
        return self.model.logits(hidden)

    def plan(self, rows: list[Row], write_slots: list[torch.Tensor]) -> StepBatch:
        """The step's inputs on the host."""
        specs, ids, last = [], [], []
        q_pos: list[int] = []
        k_pos: list[int] = []
        start = 0
        for row in rows:
            n = len(row.tokens)
            offsets, blocks = 0, []
            for block in row.view:
                blocks.append((block.slots(self.pool), offsets))
                offsets += len(block)
            specs.append(RowSpec(start, n, blocks))
            local = len(row.block) - n
            k_pos.extend(range(local, local + n))
            q_pos.extend(range(offsets - n, offsets))
            ids.extend(row.tokens)
            start += n
            if row.want_logits:
                last.append(start - 1)
        attention = self.attention
        plan = (
            attention.host_plan(specs)
            if isinstance(attention, FusedAttention)
            else attention.plan(specs, self.rotary, self.dtype)
        )
        return StepBatch(
            ids=torch.tensor(ids, dtype=torch.int32),
            write_slots=torch.cat(write_slots).to(torch.int32),
            q_pos=torch.tensor(q_pos, dtype=torch.int32),
            k_pos=torch.tensor(k_pos, dtype=torch.int32),
            last=torch.tensor(last, dtype=torch.int32),
            plan=plan,
        )

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Hidden states [R, hidden] at ``batch.last``, from a batch on the device; no host sync (a CUDA
        graph captures this)."""
        q_cos, q_sin = self.rotary.cos_sin(batch.q_pos, scaled=True)
        k_cos, k_sin = self.rotary.cos_sin(batch.k_pos, scaled=True)
        plan = batch.plan.rotated(self.rotary) if isinstance(batch.plan, KernelPlan) else batch.plan
        step = StepInputs(
            write_slots=batch.write_slots.long(),
            q_cos=q_cos[:, None].to(self.dtype),
            q_sin=q_sin[:, None].to(self.dtype),
            k_cos=k_cos[:, None].to(self.dtype),
            k_sin=k_sin[:, None].to(self.dtype),
            k_pool=self.k_pool,
            v_pool=self.v_pool,
            attention=self.attention,
            plan=plan,
            ops=self.ops,
        )
        return self.model(batch.ids, step)[batch.last]

    @torch.inference_mode()
    def roll_over(self, step: Block, into: Block, holder: PageHolder) -> None:
        """Append a finished step's K/V to ``into`` (common), page by page, re-rotating its keys once: each
        source page goes back right after it is copied, so a move needs one spare page, not a step's."""
        pool = self.pool
        for i in range(0, len(step), pool.page_size):
            ids = step.tokens[i : i + pool.page_size]
            src = step.slots(pool, i, i + len(ids))
            shift = len(into) - i
            self.move(src, into.extend(pool, ids, holder), shift)
            holder.give_back(pool, [step.pages[i // pool.page_size]])
        step.clear()

    def move(self, src: torch.Tensor, dst: torch.Tensor, shift: int) -> None:
        """Copy K/V from slots src to dst (host tensors) in every layer, rotating keys by ``shift``
        positions."""
        src, dst = src.to(self.device, non_blocking=True), dst.to(self.device, non_blocking=True)
        cos, sin = self.rotary.cos_sin(torch.tensor([shift]).to(self.device, non_blocking=True), scaled=False)
        keys = self.k_pool[:, src]
        self.k_pool[:, dst] = rotate(keys, cos.to(self.dtype), sin.to(self.dtype))
        self.v_pool[:, dst] = self.v_pool[:, src]
