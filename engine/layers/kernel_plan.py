"""The per-step plan of the fused attention kernels (Triton on the GPU, C++ on the CPU).

A *tile* is up to ``tile_tokens`` query tokens of one job attending the same keys: the tokens of all its
rows over the blocks several of them see (``common``, the shared headers and, in the combined layout, every
worker's step), or the tokens of one row over the blocks only it sees. Each query rotates by its own block
offset: the same step block sits at a different offset in each worker's view, so a piece carries one
rotation per query of its tile, an index into a small table of the step's distinct offsets (a query that
does not see the block gets one that hides all its keys). A *piece* is a run of at most ``chunk`` keys of one
block, seen by one tile. An *item* is a few consecutive pieces of one tile, about ``chunk`` keys in all: the
unit of work of one program (GPU) or task (CPU), which merges its partial softmax with the other items of
the same tokens by log-sum-exp (flash-decoding).

Why this cut:
- every block is read once per job and step, however many of its workers see it: W workers over a shared
  prefix of C keys and W steps of S keys read C + W*S keys, not W*(C + W*S) or C + W*W*S;
- a long block splits into pieces that run in parallel (split-K), which keeps the GPU busy when a step has
  only a few rows;
- a row of many tokens (a header after a rollover, a prefill chunk) has its tokens in several tiles, and one
  mask, *key view position <= query view position*, gives causality inside its own block.

The plan is built on the host as int32 tensors, which the model runner sends to the device in one copy with
the step's other inputs. A CUDA graph takes it padded to fixed sizes (``padded``): pad pieces have no keys,
pad items no pieces and no queries, pad tokens no partials, so the kernels' grids are fixed by the sizes and
the extra programs end at once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from engine.layers.rotary import Rotary
from engine.layers.rows import RowSpec

INDEX_FIELDS = (
    "key_slots", "piece_start", "piece_len", "piece_skip", "piece_rot", "rot_offset", "item_pieces",
    "query_index", "query_pos", "part", "part_start",
)  # fmt: skip
# The offset of a block a query does not see: every key's view position is then past the query's.
HIDDEN = 1 << 30
CHUNK_STEP = 64  # chunks sized to the step are multiples of the GPU kernel's key block


@dataclass(frozen=True)
class PlanSize:
    """The shapes of a plan: what a CUDA graph's static plan must hold."""

    keys: int
    pieces: int
    rots: int  # distinct block offsets
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
    piece_skip: torch.Tensor  # [pieces] the piece's first key within its block
    piece_rot: torch.Tensor  # [pieces, tile] per query of the item: its view's offset of the block, as ...
    rot_offset: torch.Tensor  # [rots] ... an index into these offsets (HIDDEN: the query does not see it)
    item_pieces: torch.Tensor  # [items + 1] item i attends pieces item_pieces[i] .. item_pieces[i+1]
    query_index: torch.Tensor  # [items, tile] packed token of each query (pads: -1)
    query_pos: torch.Tensor  # [items, tile] view position of each query
    part: torch.Tensor  # [items, tile] scratch row of each (item, query) partial
    part_start: torch.Tensor  # [tokens + 1] token t's partials are rows part_start[t] .. part_start[t+1]
    parts: int
    # Set by ``rotated``, float32 [rots, d]: rotation of a query by minus the offset, with the sign of
    # rotate_half folded into sin.
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
        return PlanSize(
            keys=len(self.key_slots),
            pieces=len(self.piece_start),
            rots=len(self.rot_offset),
            items=len(self.item_pieces) - 1,
            parts=self.parts,
            tokens=self.tokens,
            tile=self.tile,
        )

    def with_tensors(self, tensors: list[torch.Tensor]) -> KernelPlan:
        """The plan over ``tensors``: its own index tensors, moved (to the device)."""
        named: dict[str, Any] = dict(zip(INDEX_FIELDS, tensors, strict=True))
        return replace(self, **named)

    def placed(self, rotary: Rotary) -> KernelPlan:
        """This host plan on the rotary's device, tensor by tensor, with its rotations (tests, benchmarks and
        the CPU kernel; the model runner sends a step's tensors in one copy instead)."""
        return self.with_tensors([t.to(rotary.device) for t in self.tensors]).rotated(rotary)

    def rotated(self, rotary: Rotary) -> KernelPlan:
        """The plan with the queries' rotations, computed on the plan's device (inside a CUDA graph too)."""
        cos, sin = rotary.cos_sin(-self.rot_offset, scaled=False)
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
            piece_skip=pad(self.piece_skip, pieces, 0),
            piece_rot=pad(self.piece_rot, (size.pieces, size.tile), 0),
            rot_offset=pad(self.rot_offset, (size.rots,), HIDDEN),
            item_pieces=pad(self.item_pieces, (size.items + 1,), int(self.item_pieces[-1])),
            query_index=pad(self.query_index, items, -1),
            query_pos=pad(self.query_pos, items, -1),
            part=pad(self.part, items, -1),
            part_start=pad(self.part_start, (size.tokens + 1,), int(self.part_start[-1])),
            parts=size.parts,
        )


BlockKey = tuple[int, int]  # a block's slots tensor, by storage and length: the same block in every view


@dataclass
class _Query:
    token: int  # packed index
    pos: int  # view position
    offsets: dict[BlockKey, int]  # its row's view: block -> offset


class _Layout:
    """The step's key runs, query tiles, pieces and items, collected in Python lists: a few hundred rows
    cost less this way than in many small tensor ops."""

    def __init__(self, chunk: int, tile_tokens: int):
        self.chunk, self.tile_tokens = chunk, tile_tokens
        self.runs: list[torch.Tensor] = []
        self.keys = 0
        self.tiles: list[list[_Query]] = []
        self.rots: dict[int, int] = {HIDDEN: 0}  # offset -> index
        # (first key, keys, first key within the block, rotation index of each query of the tile)
        self.pieces: list[tuple[int, int, int, list[int]]] = []
        self.item_pieces: list[int] = []  # first piece of each item
        self.item_tile: list[int] = []

    def attend(self, blocks: list[tuple[BlockKey, torch.Tensor]], queries: list[_Query]) -> None:
        """Cuts the queries into tiles and lets each attend the blocks, in items of about ``chunk`` keys; each
        block's keys are added once."""
        runs = []
        for key, slots in blocks:
            self.runs.append(slots)
            runs.append((key, self.keys, len(slots)))
            self.keys += len(slots)
        for i in range(0, len(queries), self.tile_tokens):
            tile = queries[i : i + self.tile_tokens]
            self.tiles.append(tile)
            item_keys = self.chunk  # the first piece opens an item
            for key, first, length in runs:
                offsets = [q.offsets.get(key, HIDDEN) for q in tile]
                rots = [self.rots.setdefault(o, len(self.rots)) for o in offsets]
                # Keys after every query of the tile (a long row's own future) are left out.
                seen = max(q.pos - o + 1 for q, o in zip(tile, offsets, strict=True))
                for skip in range(0, min(length, seen), self.chunk):
                    if item_keys >= self.chunk:
                        self.item_pieces.append(len(self.pieces))
                        self.item_tile.append(len(self.tiles) - 1)
                        item_keys = 0
                    keys = min(self.chunk, length - skip)
                    self.pieces.append((first + skip, keys, skip, rots))
                    item_keys += keys


def build_plan(rows: list[RowSpec], chunk: int, tile_tokens: int, items: int | None = None) -> KernelPlan:
    """The host plan of a step's rows (their slots are host tensors). With ``items``, the step's distinct keys
    make about that many items where that takes chunks longer than ``chunk`` (a multiple of CHUNK_STEP)."""
    # A job's rows share their first block (its `common`, whose slots tensor the Block caches).
    jobs: dict[tuple[int, int, int], list[RowSpec]] = {}
    for row in rows:
        slots, offset = row.blocks[0]
        jobs.setdefault((slots.data_ptr(), len(slots), offset), []).append(row)
    # Each job's distinct blocks (by slots tensor) and each row's view of them: block -> offset.
    blocks: list[tuple[list[RowSpec], dict[BlockKey, torch.Tensor], list[dict[BlockKey, int]]]] = []
    for job in jobs.values():
        by_key = {(s.data_ptr(), n): s for r in job for s, _ in r.blocks if (n := s.shape[0])}
        views = [{(s.data_ptr(), n): offset for s, offset in r.blocks if (n := s.shape[0])} for r in job]
        blocks.append((job, by_key, views))
    if items:
        keys = sum(n for _, by_key, _ in blocks for _, n in by_key)
        chunk = max(chunk, -(-keys // (items * CHUNK_STEP)) * CHUNK_STEP)
    layout = _Layout(chunk, tile_tokens)
    for job, by_key, views in blocks:
        readers = Counter(key for view in views for key in view)
        queries = [
            [_Query(r.start + t, r.view_len - r.num_tokens + t, view) for t in range(r.num_tokens)]
            for r, view in zip(job, views, strict=True)
        ]
        # Blocks several rows see (every block, for a job of one row) are read once for all their tokens.
        shared = [(k, s) for k, s in by_key.items() if readers[k] > 1 or len(job) == 1]
        layout.attend(shared, [q for row_queries in queries for q in row_queries])
        if len(job) > 1:
            for view, row_queries in zip(views, queries, strict=True):
                own = [(k, by_key[k]) for k in view if readers[k] == 1]
                if own:
                    layout.attend(own, row_queries)

    width = max(len(t) for t in layout.tiles)
    item_tile = torch.tensor(layout.item_tile)

    def by_item(values: list[list[int]]) -> torch.Tensor:
        return torch.tensor([v + [-1] * (width - len(v)) for v in values])[item_tile]

    query_index = by_item([[q.token for q in t] for t in layout.tiles])
    query_pos = by_item([[q.pos for q in t] for t in layout.tiles])
    piece_first, piece_keys, piece_skip = torch.tensor([p[:3] for p in layout.pieces]).unbind(1)
    piece_rot = torch.tensor([p[3] + [0] * (width - len(p[3])) for p in layout.pieces])

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
        piece_skip=int32(piece_skip),
        piece_rot=int32(piece_rot),
        rot_offset=int32(torch.tensor(list(layout.rots))),
        item_pieces=int32(torch.tensor([*layout.item_pieces, len(layout.pieces)])),
        query_index=int32(query_index),
        query_pos=int32(query_pos),
        part=int32(part),
        part_start=int32(part_start),
        parts=len(owners),
    )
