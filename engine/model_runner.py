"""Runs one forward pass for the rows of all jobs and owns the K/V tensors of the pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.block_manager import Block, PagePool
from engine.layers.attention import ATTENTION_BACKENDS, Attention, RowSpec
from engine.layers.rotary import Rotary, rotate
from engine.models.llama import LlamaModel, StepInputs


@dataclass
class Row:
    """One writer in a forward pass: ``tokens`` are appended to ``block``, the last block of ``view``."""

    tokens: list[int]
    block: Block
    view: list[Block]
    want_logits: bool


class ModelRunner:
    def __init__(self, model: LlamaModel, rotary: Rotary, pool: PagePool, attention: str, dtype: torch.dtype):
        shape = model.shape
        self.model, self.rotary, self.pool, self.dtype = model, rotary, pool, dtype
        self.device = pool.device
        self.attention: Attention = ATTENTION_BACKENDS[attention]()
        # Stored head-major, [layers, kv_heads, slots, d], seen by everyone as [layers, slots, kv_heads, d]:
        # a gather of one head's keys then reads 2*d-byte runs into [kv_heads, keys, d], the layout the
        # attention matmuls take without a transposing copy (on the CPU that copy cost more than the matmul).
        size = (shape.num_layers, shape.num_kv_heads, pool.num_pages * pool.page_size, shape.head_dim)
        self.k_pool = torch.zeros(size, dtype=dtype, device=self.device).transpose(1, 2)
        self.v_pool = torch.zeros(size, dtype=dtype, device=self.device).transpose(1, 2)

    @torch.inference_mode()
    def run(self, rows: list[Row], write_slots: list[torch.Tensor]) -> torch.Tensor:
        """Logits [rows with want_logits, vocab] at each such row's last token.

        Every row's block has already been extended by its tokens (``write_slots`` are their slots), so the
        views' lengths include this step's tokens of all rows.
        """
        specs, q_pos, k_pos, ids, last = [], [], [], [], []
        start = 0
        for row in rows:
            n = len(row.tokens)
            offsets, blocks = 0, []
            for block in row.view:
                blocks.append((block.slots(self.pool), offsets))
                offsets += len(block)
            specs.append(RowSpec(start, n, blocks))
            local = len(row.block) - n
            k_pos.append(torch.arange(local, local + n))
            q_pos.append(torch.arange(offsets - n, offsets))
            ids.extend(row.tokens)
            start += n
            if row.want_logits:
                last.append(start - 1)
        device = self.device
        q_cos, q_sin = self.rotary.cos_sin(torch.cat(q_pos).to(device), scaled=True)
        k_cos, k_sin = self.rotary.cos_sin(torch.cat(k_pos).to(device), scaled=True)
        step = StepInputs(
            write_slots=torch.cat(write_slots),
            q_cos=q_cos[:, None].to(self.dtype),
            q_sin=q_sin[:, None].to(self.dtype),
            k_cos=k_cos[:, None].to(self.dtype),
            k_sin=k_sin[:, None].to(self.dtype),
            k_pool=self.k_pool,
            v_pool=self.v_pool,
            attention=self.attention,
            plan=self.attention.plan(specs, self.rotary, self.dtype),
        )
        hidden = self.model(torch.tensor(ids, device=device), step)
        return self.model.logits(hidden[torch.tensor(last, device=device, dtype=torch.long)])

    @torch.inference_mode()
    def move(self, src: torch.Tensor, dst: torch.Tensor, shift: int) -> None:
        """Copy K/V from slots src to dst in every layer, rotating keys by ``shift`` positions."""
        cos, sin = self.rotary.cos_sin(torch.tensor([shift], device=self.device), scaled=False)
        keys = self.k_pool[:, src]
        self.k_pool[:, dst] = rotate(keys, cos.to(self.dtype), sin.to(self.dtype))
        self.v_pool[:, dst] = self.v_pool[:, src]
