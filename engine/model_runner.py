"""Runs one forward pass for the rows of all jobs and owns the K/V tensors of the pool.

A step is planned on the host (token ids, slots, positions, the attention's plan) and its int32 tensors go
to the device in one copy that does not block the host, so a GPU step waits on the host only where the
sampled tokens are read back. Steps of the fused kernel can be replayed from CUDA graphs
(engine/step_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from engine.layers.attention import FusedAttention
from engine.layers.backends import ATTENTION_BACKENDS, Attention, triton_ops
from engine.layers.kernel_plan import KernelPlan
from engine.layers.ops import CpuOps, TorchOps
from engine.layers.rotary import Rotary, rotate
from engine.layers.rows import RowSpec
from engine.models.llama import LlamaModel
from engine.models.step_inputs import StepInputs
from engine.pages import Block, PageHolder, PagePool
from engine.step_batch import Staging, StepBatch
from engine.step_graphs import StepGraphs

if TYPE_CHECKING:
    from engine.parallel import Followers


@dataclass
class Row:
    """One writer in a forward pass: ``tokens`` are appended to ``block``, the last block of ``view``."""

    tokens: list[int]
    block: Block
    view: list[Block]
    want_logits: bool


class ModelRunner:
    """The forward pass of one rank. With tensor parallelism (engine/parallel.py) rank 0's runner sends
    each step's packed rows and each page move to its ``peers`` first, and every rank runs them alike."""

    def __init__(
        self,
        model: LlamaModel,
        rotary: Rotary,
        pool: PagePool,
        attention: str,
        dtype: torch.dtype,
        cuda_graphs: bool = False,
        fused_ops: bool = True,
        peers: Followers | None = None,
    ):
        shape = model.shape
        self.model, self.rotary, self.pool, self.dtype, self.peers = model, rotary, pool, dtype, peers
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
            self.graphs = StepGraphs(self)

    @torch.inference_mode()
    def run(self, rows: list[Row], write_slots: list[torch.Tensor]) -> torch.Tensor:
        """Logits [rows with want_logits, vocab] at each such row's last token.

        Every row's block has already been extended by its tokens (``write_slots`` are their slots), so the
        views' lengths include this step's tokens of all rows.
        """
        batch = self.pack(rows, write_slots)
        if self.peers is not None:
            self.peers.send("run_batch", batch)
        return self.run_batch(batch)

    def run_batch(self, batch: StepBatch) -> torch.Tensor:
        """Logits of a packed batch, whose attention is planned here: each rank plans its own from the
        same rows, at the same time, rather than wait for rank 0's plan."""
        batch = replace(batch, plan=self.plan(batch.plan))
        hidden = self.graphs.run(batch) if self.graphs is not None else None
        if hidden is None:
            hidden = self.forward(batch.with_tensors(self.staging.send(batch.tensors)))
        return self.model.logits(hidden)

    def pack(self, rows: list[Row], write_slots: list[torch.Tensor]) -> StepBatch:
        """The step's inputs on the host, with the rows' specs where the attention's plan goes."""
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
        return StepBatch(
            ids=torch.tensor(ids, dtype=torch.int32),
            write_slots=torch.cat(write_slots).to(torch.int32),
            q_pos=torch.tensor(q_pos, dtype=torch.int32),
            k_pos=torch.tensor(k_pos, dtype=torch.int32),
            last=torch.tensor(last, dtype=torch.int32),
            plan=specs,
        )

    def plan(self, specs: list[RowSpec]) -> Any:
        """The attention's plan of the rows: on the host for the fused kernels (sent with the step's
        tensors), on the device for the others."""
        attention = self.attention
        if isinstance(attention, FusedAttention):
            return attention.host_plan(specs)
        return attention.plan(specs, self.rotary, self.dtype)

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
        if self.peers is not None:
            self.peers.send("move", src, dst, shift)
        src, dst = src.to(self.device, non_blocking=True), dst.to(self.device, non_blocking=True)
        cos, sin = self.rotary.cos_sin(torch.tensor([shift]).to(self.device, non_blocking=True), scaled=False)
        keys = self.k_pool[:, src]
        self.k_pool[:, dst] = rotate(keys, cos.to(self.dtype), sin.to(self.dtype))
        self.v_pool[:, dst] = self.v_pool[:, src]
