"""The collaboration format: what the workers are told, the blocks of a layout, and the text rules.

Everything here is plain text; the engine tokenizes it. The structure follows the Hogwild! paper
(DESIGN.md section 2); the wording is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("combined", "interleaved", "contiguous")
NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Nia")

OTHERS_HEADER = "\n\n### Work in progress (others)\n\n"
OWN_HEADER = "<...>\n\n### Work in progress (own)\n\n"
QUICK_CHECK = "Quick check: am I doing redundant work? (yes/no): "
FINISHER = (
    "\n\nWait, given the limited time, I have to give an answer right now. Considering all my previous "
    "attempts, I have to conclude that the final answer is \\boxed{"
)
ANSWER_PREFIX = "\\boxed{"

INSTRUCTIONS = """You are one of {count} assistants ({names}) solving the problem below together, \
at the same time. You all share one memory: you can read what the others write the moment they write it.

How the shared text is laid out:
- First comes the history of finished steps, each tagged with the author's name and step number, like \
"**{first} [3]:** ...".
- Then, under "### Work in progress (others)", the unfinished current step of every other assistant.
- Last, under "### Work in progress (own)", your own current step, which you simply continue.

Work as a team: split the problem, build on each other's results, and check each other's reasoning. If you \
find that you are doing the same thing as someone else, stop and do something different. From time to \
time you will be asked whether you are doing redundant work: answer honestly and change course if so. \
When the team has the answer, write it as \\boxed{{answer}}.

Problem:
"""


def worker_name(index: int) -> str:
    base = NAMES[index % len(NAMES)]
    return base if index < len(NAMES) else f"{base}{index // len(NAMES) + 1}"


def instructions(workers: int) -> str:
    """A lone worker has no one to collaborate with, so it gets the problem as asked."""
    if workers == 1:
        return ""
    names = [worker_name(i) for i in range(workers)]
    return INSTRUCTIONS.format(count=workers, names=", ".join(names), first=names[0])


def opener(index: int, workers: int) -> str:
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
    """Which static blocks a layout has and how a worker's view is ordered."""

    name: str

    @property
    def rolls_over(self) -> bool:
        return self.name != "contiguous"

    def worker_block(self, index: int) -> str:
        prefix = "out" if self.name == "contiguous" else "step"
        return f"{prefix}:{worker_name(index)}"

    def static_blocks(self) -> list[tuple[str, str]]:
        """(name, text) of the blocks computed once after the prompt, in order."""
        if self.name == "combined":
            return [("others_header", OTHERS_HEADER), ("own_header", OWN_HEADER)]
        if self.name == "contiguous":
            return [("split_marker", OWN_HEADER)]
        return []

    def view(self, index: int, workers: int) -> list[str]:
        own = self.worker_block(index)
        others = [self.worker_block(j) for j in range(workers) if j != index]
        if self.name == "combined":
            return ["common", "others_header", *others, "own_header", own]
        if self.name == "contiguous":
            return ["common", *others, "split_marker", own]
        return ["common", own]


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


def find_answer(text: str, prefix: str = ANSWER_PREFIX) -> str | None:
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
