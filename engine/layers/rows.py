"""A step's rows as every attention backend and the kernel plan see them: a row's packed tokens and the
pool slots of the blocks of its view."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# Rows with more input tokens than this are attended alone, so that one long prefill chunk does not pad
# the queries of every decode row.
SHORT_ROW_TOKENS = 16


@dataclass
class RowSpec:
    """One row of a step: its tokens occupy packed positions [start, start + num_tokens)."""

    start: int
    num_tokens: int
    blocks: list[tuple[torch.Tensor, int]]  # (pool slots of the block's visible tokens, offset), view order;
    # the slots are host tensors: a step is planned on the host and its plan sent to the device at once

    @cached_property
    def view_len(self) -> int:
        return sum(len(slots) for slots, _ in self.blocks)
