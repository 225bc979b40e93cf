"""A job's trace: everything needed to replay it through an independent reference.

Recorded only for jobs submitted with ``trace=True``. The reference (tests/reference_hogwild.py) reads these
records and nothing else of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TraceRow:
    """One row of one forward pass: tokens appended to ``block`` and the view they were computed in.

    ``view`` lists (block name, length) in view order *during* the step, so lengths already include the
    tokens that every row of the step appended (same-step visibility). ``block`` is always the last entry.
    ``worker`` is -1 for prefill rows (the prompt and the static header blocks). A ``reused`` row is one
    step of its own: prompt pages another job computed, which the reference computes like any prefill row.
    """

    worker: int
    block: str
    tokens: list[int]
    view: list[tuple[str, int]]
    logits: torch.Tensor | None = None  # [vocab] at the last input token, for worker rows
    next_token: int | None = None  # the token sampled from ``logits``; None if nothing was sampled
    uniform: float | None = None  # the uniform in [0, 1) the token was drawn with; None when greedy
    banned: tuple[int, ...] = ()  # ids the row could not sample: the job's suppressed ones and the guard's
    reused: bool = False  # a prompt row whose K/V the engine read from the prefix cache, not computed


@dataclass
class Rollover:
    """After a step, ``block`` (a finished step) was appended to the end of ``into`` and emptied."""

    worker: int
    block: str
    into: str
    length: int


@dataclass
class TraceStep:
    rows: list[TraceRow] = field(default_factory=list)
    rollovers: list[Rollover] = field(default_factory=list)
