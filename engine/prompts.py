"""What the workers are told: instruction presets, each a text and worked examples.

A preset's text has the placeholders ``{count}``, ``{names}``, ``{first}`` and ``{layout}`` (what the
shared text looks like in the job's layout); its examples are message lists written with the names
``{A}``, ``{B}`` and ``{C}``, placed as earlier chat turns before the problem, as the paper does. An
example that needs more workers than the job has is left out. ``load_presets`` reads more from a JSON file
(``--presets``), so a prompt can be tried without a code change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.collab import worker_name

PROBLEM = "Problem:\n"

LAYOUT_TEXT = {
    "combined": """The shared text you see is laid out in three parts:
- First, the history: every finished step, tagged with its author and step number, like \
"**{first} [3]:** ...". Steps appear in the order they were finished.
- Then, under "### Work in progress (others)", the step each other assistant is writing right now. These \
are unfinished: each one stops at a "<...>" mark, often in the middle of a sentence, and grows as its \
author writes.
- Last, under "### Work in progress (own)", your own current step. You simply continue it.""",
    "interleaved": """The shared text you see is the history: every finished step, tagged with its author \
and step number, like "**{first} [3]:** ...", in the order the steps were finished. A step appears there \
only once its author has finished it, so the others may be halfway through a step you cannot see yet. \
Your own current step comes last, after the history; you simply continue it.""",
    "contiguous": """The shared text you see holds each other assistant's whole work so far, one after \
another, each stopping at a "<...>" mark where its author is writing right now (often in the middle of a \
sentence). Then, under "### Work in progress (own)", comes your own work, which you simply continue.""",
    "plain": "",
}

SHORT = """You are one of {count} assistants ({names}) solving the problem below together, at the same \
time. You all share one memory: you can read what the others write the moment they write it.

{layout}

Work as a team: split the problem, build on each other's results, and check each other's reasoning. If you \
find that you are doing the same thing as someone else, stop and do something different. From time to \
time you will be asked whether you are doing redundant work: answer honestly and change course if so. \
When the team has the final answer, write it inside \\boxed{{}}."""

FULL = """# Solving a problem together

You are one of {count} assistants ({names}) working on the same problem at the same time. You share one \
memory: every word any of you writes is visible to all the others at once, while they are still writing.

{layout}

You write in short steps. A step ends at a blank line after a finished sentence; then a new step starts \
with your name and its number. Only write your own steps: never write a step header for someone else.

# How to collaborate
- Plan first: in your first steps, agree on who does what. Split the problem into parts that can be done \
at the same time.
- Take a part nobody has taken yet. Say what you are starting, so others do not start it too.
- Reuse what others have finished instead of redoing it, and build on their results.
- Check each other: when someone reaches a result, one of you verifies it a different way.
- Watch for duplicated work. If you notice you are doing what someone else is already doing (for \
example: "Wait, {first} is already computing this, I'll do the other case instead"), stop at once and \
switch to something else.
- From time to time you will be asked "Quick check: am I doing redundant work? (yes/no)". Answer \
honestly, and if the answer is yes, change what you do right away.
- If you disagree about a result, say so and explain; if you cannot settle it, {first}'s version is the \
one the team goes with.
- When the team agrees on the final answer, any one of you writes it once as \\boxed{{}} with the answer \
inside, for example \\boxed{{12}}. Do not write a box before the answer is known."""

# Worked examples: complete little dialogues in the history format, ending with the boxed answer.
EXAMPLES: tuple[tuple[dict[str, str], ...], ...] = (
    (
        {
            "role": "user",
            "content": "A shop sells pens at 3 for $2. How much do 12 pens and 5 notebooks at $4 each cost?",
        },
        {
            "role": "assistant",
            "content": """**{A} [1]:** Hi, I'm {A}. Here's how we can split it: I'll \
price the pens, {B} can price the notebooks, then we add.

**{B} [1]:** Hi, I'm {B}. Sounds good, I'll take the notebooks.

**{A} [2]:** 12 pens are 12 / 3 = 4 groups of 3, so 4 x $2 = $8.

**{B} [2]:** 5 notebooks at $4 each cost 5 x 4 = $20.

**{A} [3]:** Adding {B}'s $20 to my $8 gives $28.

**{B} [3]:** I checked both parts: 8 + 20 = 28. \\boxed{{28}}""",
        },
    ),
    (
        {"role": "user", "content": "Find the sum of all positive divisors of 36."},
        {
            "role": "assistant",
            "content": """**{A} [1]:** Hi, I'm {A}. Here's how we can do it: list the \
divisors, or use the formula for the sum of divisors. I'll list them.

**{B} [1]:** Hi, I'm {B}. I'll use the formula: 36 = 2^2 x 3^2.

**{A} [2]:** Divisors in pairs: 1 and 36, 2 and 18, 3 and 12, 4 and 9, 6.

**{B} [2]:** The sum is (1 + 2 + 4)(1 + 3 + 9) = 7 x 13 = 91.

**{A} [3]:** Quick check: am I doing redundant work? (yes/no): yes, {B} already has the total from the \
formula. Instead I'll verify it: 1 + 36 + 2 + 18 + 3 + 12 + 4 + 9 + 6 = 91. It matches.

**{B} [3]:** Both ways give 91. \\boxed{{91}}""",
        },
    ),
    (
        {
            "role": "user",
            "content": "A train leaves at 9:40 and arrives at 13:15. A bus for the same trip "
            "takes 50 minutes longer. How many minutes does the bus take?",
        },
        {
            "role": "assistant",
            "content": """**{A} [1]:** Hi, I'm {A}. Here's how we can go: first the \
train's time, then add 50 minutes. {B}, take the hours, {C}, the minutes?

**{B} [1]:** Hi, I'm {B}. From 9:40 to 12:40 is 3 hours, that is 180 minutes.

**{C} [1]:** Hi, I'm {C}. From 12:40 to 13:15 is 35 minutes.

**{A} [2]:** I was about to count the hours too. Wait, {B} already did that, so I'll add instead: \
180 + 35 = 215 minutes for the train.

**{B} [2]:** The bus takes 215 + 50 = 265 minutes.

**{C} [2]:** Check: 265 minutes is 4 h 25 min, and 3 h 35 min + 50 min = 4 h 25 min. Agreed. \
\\boxed{{265}}""",
        },
    ),
)


@dataclass(frozen=True)
class Preset:
    name: str
    text: str
    examples: tuple[tuple[dict[str, str], ...], ...] = field(default=())

    def instructions(self, workers: int, layout: str) -> str:
        names = [worker_name(i) for i in range(workers)]
        layout_text = LAYOUT_TEXT[layout].format(first=names[0])
        return self.text.format(count=workers, names=", ".join(names), first=names[0], layout=layout_text)

    def example_turns(self, workers: int) -> list[dict[str, str]]:
        """The examples the job's workers can act out, with their names, as chat turns."""
        names = {key: worker_name(i) for i, key in enumerate("ABC")}
        turns: list[dict[str, str]] = []
        for example in self.examples:
            needed = sum(any(f"{{{key}}}" in m["content"] for m in example) for key in "ABC")
            if needed <= workers:
                turns += [{**m, "content": m["content"].format(**names)} for m in example]
        return turns

    def render(self, messages: list[dict[str, str]], workers: int, layout: str) -> list[dict[str, str]]:
        """The conversation the model reads: leading system messages, the worked examples, then the
        user's turns; every problem (the examples' and the last user message) after ``PROBLEM``, and the
        instructions in front of the first user turn."""
        if not self.text:
            return messages
        lead = 0
        while lead < len(messages) and messages[lead]["role"] == "system":
            lead += 1
        rest = [dict(m) for m in messages[lead:]]
        last = max(i for i, m in enumerate(rest) if m["role"] == "user")
        rest[last]["content"] = PROBLEM + rest[last]["content"]
        examples = [
            {**m, "content": PROBLEM + m["content"]} if m["role"] == "user" else m
            for m in self.example_turns(workers)
        ]
        out = messages[:lead] + examples + rest
        first = next(i for i, m in enumerate(out) if m["role"] == "user")
        out[first] = {
            **out[first],
            "content": self.instructions(workers, layout) + "\n\n" + out[first]["content"],
        }
        return out


BUILTIN = {
    "full": Preset("full", FULL, EXAMPLES),
    "short": Preset("short", SHORT),
    "none": Preset("none", ""),
}


def load_presets(path: str | Path) -> dict[str, Preset]:
    """Presets from a JSON object ``{name: {"text": ..., "examples": [[message, ...], ...]}}``; the text
    is checked by rendering it once, so a bad placeholder fails at start-up, not in a job."""
    data: Any = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of presets")
    presets = {}
    for name, spec in data.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("text"), str):
            raise ValueError(f"{path}: preset {name!r} needs a 'text' string")
        examples = tuple(
            tuple({"role": str(m["role"]), "content": str(m["content"])} for m in example)
            for example in spec.get("examples", [])
        )
        preset = Preset(str(name), spec["text"], examples)
        try:
            preset.render([{"role": "user", "content": "1 + 1"}], 3, "combined")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{path}: preset {name!r} does not render: {exc!r}") from exc
        presets[str(name)] = preset
    return presets
