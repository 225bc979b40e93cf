"""The collaboration format: the blocks of a layout, the headers, and the text rules.

Everything here is plain text; the engine tokenizes it. The structure follows the Hogwild! paper; the
wording is ours. What the workers are told (instructions and worked examples) is in ``engine/prompts.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.protocol import worker_name

OTHERS_HEADER = "\n\n### Work in progress (others)\n\n"
CUT = "<...>\n\n"  # where another worker's unfinished text currently ends
OWN_HEADER = CUT + "### Work in progress (own)\n\n"
QUICK_CHECK = "Quick check: am I doing redundant work? (yes/no): "
FINISHER = (
    "\n\nWait, given the limited time, I have to give an answer right now. Considering all my previous "
    "attempts, I have to conclude that the final answer is \\boxed{"
)
ANSWER_PREFIX = "\\boxed{"
# Text whose tokens multi-worker jobs never sample (with BOS and EOS): a worker must not forge the
# layout's section headers nor leave the reasoning mode.
GUARDED_TEXT = ("#", "</think>")
# What a worker copies from an instruction instead of answering: never an answer.
PLACEHOLDERS = ("", "answer", "answer here", "your answer", "final answer", "...", "x")


def opener(index: int, workers: int, layout: str) -> str:
    """The forced start of a worker's text; a plain sequence has none."""
    if layout == "plain":
        return ""
    name = worker_name(index)
    if workers == 1:
        return step_header(index, 1)
    if index == 0:
        return f"**{name} [1]:** Hi, I'm {name}. Here's how we can"
    return f"**{name} [1]:** Hi, I'm {name}."


def step_header(index: int, step: int) -> str:
    return f"**{worker_name(index)} [{step}]:** "


@dataclass(frozen=True)
class Layout:
    """Which static blocks a layout has and how each view is ordered.

    Blocks: ``common`` (the prompt and, in the rolling layouts, every finished step), each worker's own
    block (``step:<Name>``, or ``out:<Name>`` where it is never rolled over), and static blocks computed
    once after the prompt: the headers and one cut mark per worker (``cut:<k>``; each position has its own
    block so that no block is read twice in a view)."""

    name: str
    workers: int

    @property
    def rolls_over(self) -> bool:
        return self.name in ("combined", "interleaved")

    def worker_block(self, index: int) -> str:
        prefix = "step" if self.rolls_over else "out"
        return f"{prefix}:{worker_name(index)}"

    def static_blocks(self) -> list[tuple[str, str]]:
        """(name, text) of the blocks computed once after the prompt, in order."""
        if self.name == "plain":
            return []
        head = [] if self.name == "contiguous" else [("others_header", OTHERS_HEADER)]
        cuts = [(f"cut:{k}", CUT) for k in range(1, self.workers + 1)]
        own = [("own_header", OWN_HEADER)] if self.name != "interleaved" else []
        return head + cuts + own

    def prefill_view(self, name: str) -> list[str]:
        """The view a static block is computed in, once: after the prompt and the others' header, where
        each of them is read (so a one-worker view is exactly one sequence)."""
        if name == "common":
            return ["common"]
        head = [] if self.name in ("contiguous", "plain") or name == "others_header" else ["others_header"]
        return ["common", *head, name]

    def _others(self, blocks: list[str]) -> list[str]:
        """Other workers' texts one after another, each but the last ended by its own cut mark."""
        out: list[str] = []
        for k, block in enumerate(blocks, start=1):
            out += [block, f"cut:{k}"] if k < len(blocks) else [block]
        return out

    def view(self, index: int) -> list[str]:
        own = self.worker_block(index)
        others = [self.worker_block(j) for j in range(self.workers) if j != index]
        if self.name == "combined":
            return ["common", "others_header", *self._others(others), "own_header", own]
        if self.name == "contiguous":
            return ["common", *self._others(others), "own_header", own]
        return ["common", own]

    def finisher_view(self) -> list[str]:
        """What the finisher reads before its own block: every worker's text, each ended by a cut mark
        (a plain sequence simply goes on)."""
        blocks = [self.worker_block(j) for j in range(self.workers)]
        if self.name == "plain":
            return ["common", *blocks]
        head = [] if self.name == "contiguous" else ["others_header"]
        cut = [name for k, b in enumerate(blocks, start=1) for name in (b, f"cut:{k}")]
        return ["common", *head, *cut]


SENTENCE_ENDS = (".", "?", "!", ":", "...", "。")


def ends_step(step_text: str, last_token_text: str) -> bool:
    """A step ends at a token that completes a paragraph break after a finished sentence, outside code
    and display math (so a step never splits a block the others would then read half of). Tokenizers
    write the break as one token or as two single newlines; both count."""
    completes_break = "\n" in last_token_text and step_text.endswith("\n\n")
    if "\n\n" not in last_token_text and not completes_break:
        return False
    before = step_text[: step_text.rfind("\n\n")].rstrip()
    if not before.endswith(SENTENCE_ENDS):
        return False
    return step_text.count("```") % 2 == 0 and step_text.count("$$") % 2 == 0


def find_boxed(text: str, prefix: str = ANSWER_PREFIX) -> str | None:
    """The content of the last complete ``prefix ... }`` in text, braces balanced; None if there is none."""
    found = None
    start = text.find(prefix)
    while start != -1:
        depth, i = 1, start + len(prefix)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[start + len(prefix) : i - 1].strip()
        start = text.find(prefix, start + 1)
    return found


@dataclass(frozen=True)
class AnswerRule:
    """Finds a job's answer in a worker's text: the rightmost ``\\boxed{}`` by default, or the one group of
    ``pattern`` (multiple choice, a code block). Placeholders copied from an instruction never count."""

    pattern: str | None = None

    def find(self, text: str) -> str | None:
        if self.pattern is None:
            found = find_boxed(text)
        else:
            matches = list(re.finditer(self.pattern, text, flags=re.DOTALL))
            found = matches[-1].group(1).strip() if matches else None
        if found is None or found.lower().strip(" .") in PLACEHOLDERS:
            return None
        return found


def check_answer_pattern(pattern: str | None) -> str | None:
    """A request's answer pattern, compiled once here so that a bad one is refused, not a job's error."""
    if pattern is None:
        return None
    from engine.errors import InvalidRequest

    if not isinstance(pattern, str) or len(pattern) > 500:
        raise InvalidRequest("answer_pattern", "answer_pattern must be a regex of at most 500 characters")
    try:
        groups = re.compile(pattern).groups
    except re.error as exc:
        raise InvalidRequest("answer_pattern", f"answer_pattern is not a valid regex: {exc}") from None
    if groups != 1:
        raise InvalidRequest("answer_pattern", f"answer_pattern must have exactly one group, not {groups}")
    return pattern


def header_guard(workers: int) -> re.Pattern[str]:
    """Text that ends in ``**Name`` for one of the job's workers: the next token must not open ``[``, or
    the worker would forge a step header the others would read as a real one."""
    names = "|".join(re.escape(worker_name(i)) for i in range(workers))
    return re.compile(rf"\*\*\s?(?:{names})\s?$")
