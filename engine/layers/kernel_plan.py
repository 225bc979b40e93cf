"""The per-step plan of the fused attention kernels (Triton on the GPU, C++ on the CPU).

A *tile* is up to ``tile_tokens`` query tokens that see the same keys at the same view offsets: the tokens of
one row, or, over their shared first block (``common``), the tokens of all rows of one job. A *piece* is a
run of at most ``chunk`` keys of one block, seen by one tile. An *item* is a few consecutive pieces of one
tile, about ``chunk`` keys in all: the unit of work of one program (GPU) or task (CPU), which merges its
partial softmax with the other items of the same tokens by log-sum-exp (flash-decoding).

Why this cut:
- a job's ``common`` block, the longest of the step, is read once per job instead of once per worker, while
  each row's small blocks (headers, the other workers' steps, its own step) are read by that row alone;
- a long block splits into pieces that run in parallel (split-K), which keeps the GPU busy when a step has
  only a few rows;
- a row of many tokens (a header after a rollover, a prefill chunk) is a row with several tiles, and one
  mask, *key view position <= query view position*, gives causality inside its own block.

The plan is built on the host as int32 tensors, which the model runner sends to the device in one copy with
the step's other inputs. A CUDA graph takes it padded to fixed sizes (``padded``): pad pieces have no keys,
pad items no pieces and no queries, pad tokens no partials, so the kernels' grids are fixed by the sizes and
the extra programs end at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from itertools import chain
from typing import Any

import torch

from engine.layers.attention import RowSpec
from engine.layers.rotary import Rotary

INDEX_FIELDS = (
    "key_slots", "piece_start", "piece_len", "piece_pos", "piece_offset", "item_pieces",
    "query_index", "query_pos", "part", "part_start",
)  # fmt: skip


@dataclass(frozen=True)
class PlanSize:
    """The shapes of a plan: what a CUDA graph's static plan must hold."""

    keys: int
    pieces: int
    items: int
    parts: int  # rows of the partial-result scratch
    tokens: int
    tile: int  # query tokens per item

    def holds(self, other: PlanSize) -> bool:
        return all(getattr(self, f.name) >= getattr(other, f.name) for f in fields(self))


@dataclass
class KernelPlan:
    """Per-step metadata shared by every layer: int32 tensors, built on the host."""

    key_slots: torch.Tensor  # [keys] pool slots of every key run, runs back to back
    piece_start: torch.Tensor  # [pieces] the piece's first key in key_slots
    piece_len: torch.Tensor  # [pieces]
    piece_pos: torch.Tensor  # [pieces] view position of the piece's first key
    piece_offset: torch.Tensor  # [pieces] view offset of the piece's block
    item_pieces: torch.Tensor  # [items + 1] item i attends pieces item_pieces[i] .. item_pieces[i+1]
    query_index: torch.Tensor  # [items, tile] packed token of each query (pads: -1)
    query_pos: torch.Tensor  # [items, tile] view position of each query
    part: torch.Tensor  # [items, tile] scratch row of each (item, query) partial
    part_start: torch.Tensor  # [tokens + 1] token t's partials are rows part_start[t] .. part_start[t+1]
    parts: int
    # Set by ``rotated``, float32 [pieces, d]: rotation of the queries by minus the piece's block offset,
    # with the sign of rotate_half folded into sin.
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in INDEX_FIELDS]

    @property
    def tokens(self) -> int:
        return len(self.part_start) - 1

    @property
    def tile(self) -> int:
        return self.query_index.shape[1]

    @property
    def size(self) -> PlanSize:
        items = len(self.item_pieces) - 1
        return PlanSize(len(self.key_slots), len(self.piece_start), items, self.parts, self.tokens, self.tile)

    def with_tensors(self, tensors: list[torch.Tensor]) -> KernelPlan:
        """The plan over ``tensors``: its own index tensors, moved (to the device)."""
        named: dict[str, Any] = dict(zip(INDEX_FIELDS, tensors, strict=True))
        return replace(self, **named)

    def rotated(self, rotary: Rotary) -> KernelPlan:
        """The plan with the queries' rotations, computed on the plan's device (inside a CUDA graph too)."""
        cos, sin = rotary.cos_sin(-self.piece_offset, scaled=False)
        half = cos.shape[-1] // 2
        sign = torch.cat([-torch.ones(half, device=cos.device), torch.ones(half, device=cos.device)])
        return replace(self, cos=cos, sin=sin * sign)

    def padded(self, size: PlanSize) -> KernelPlan:
        """This (host) plan grown to ``size``: pads attend nothing and own nothing."""

        def pad(x: torch.Tensor, shape: tuple[int, ...], value: int) -> torch.Tensor:
            out = torch.full(shape, value, dtype=x.dtype)
            out[tuple(slice(0, n) for n in x.shape)] = x
            return out

        pieces, items = (size.pieces,), (size.items, size.tile)
        return KernelPlan(
            key_slots=pad(self.key_slots, (size.keys,), 0),
            piece_start=pad(self.piece_start, pieces, 0),
            piece_len=pad(self.piece_len, pieces, 0),
            piece_pos=pad(self.piece_pos, pieces, 0),
            piece_offset=pad(self.piece_offset, pieces, 0),
            item_pieces=pad(self.item_pieces, (size.items + 1,), int(self.item_pieces[-1])),
            query_index=pad(self.query_index, items, -1),
            query_pos=pad(self.query_pos, items, -1),
            part=pad(self.part, items, -1),
            part_start=pad(self.part_start, (size.tokens + 1,), int(self.part_start[-1])),
            parts=size.parts,
        )


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


def build_plan(rows: list[RowSpec], chunk: int, tile_tokens: int) -> KernelPlan:
    """The host plan of a step's rows (their slots are host tensors)."""
    layout = _Layout(chunk, tile_tokens)
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

    def int32(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.int32)

    return KernelPlan(
        key_slots=int32(torch.cat(layout.runs)),
        piece_start=int32(piece_first),
        piece_len=int32(piece_keys),
        piece_pos=int32(piece_pos),
        piece_offset=int32(piece_offset),
        item_pieces=int32(torch.tensor([*layout.item_pieces, len(layout.pieces)])),
        query_index=int32(query_index),
        query_pos=int32(query_pos),
        part=int32(part),
        part_start=int32(part_start),
        parts=len(owners),
    )


class FusedAttention:
    """A backend that runs one kernel plan for all rows (the Triton kernel). The model runner sends such a
    plan to the device with the step's inputs in one copy, and can replay its steps from CUDA graphs.

    ``chunk`` is about the keys of one item (split-K), ``tile_tokens`` bounds the query tokens of one item.
    """

    def __init__(self, chunk: int = 256, tile_tokens: int = 64):
        self.chunk, self.tile_tokens = chunk, tile_tokens

    def host_plan(self, rows: list[RowSpec]) -> KernelPlan:
        return build_plan(rows, self.chunk, self.tile_tokens)

    def plan(self, rows: list[RowSpec], rotary: Rotary, dtype: torch.dtype) -> KernelPlan:
        plan = self.host_plan(rows)
        return plan.with_tensors([t.to(rotary.device) for t in plan.tensors]).rotated(rotary)
