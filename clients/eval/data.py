"""Problems with reference answers, read from JSONL (or a JSON array) in the shapes datasets are exported in.

Keys are found without flags for the usual exports: the problem under ``problem``, ``question`` or
``prompt``; the reference under ``answer``, ``solution`` or ``final_answer`` (and ``--problem-key`` /
``--answer-key`` name others). References are reduced to the answer itself: the last ``\\boxed{}`` of a
written solution (MATH), the part after ``####`` (GSM8K), the first entry of a list (OlympiadBench's
``final_answer``), surrounding ``$`` removed. A record's id is its ``id``/``unique_id``/``problem_id``/
``idx`` when it has one, else the file's name and line number, so ids stay put under ``--shuffle``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROBLEM_KEYS = ("problem", "question", "prompt")
ANSWER_KEYS = ("answer", "solution", "final_answer")
ID_KEYS = ("id", "unique_id", "problem_id", "idx")
CHOICE_KEYS = ("choices", "options")
SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample.jsonl"


class DataError(ValueError):
    """A data file that cannot be used as given; the message names the file and line."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    reference: str
    choices: tuple[str, ...] = field(default=())


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    found = None
    for prefix in ("\\boxed{", "\\fbox{"):
        start = text.find(prefix)
        while start != -1:
            depth, i = 1, start + len(prefix)
            while i < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            if depth == 0 and (found is None or start > found[0]):
                found = (start, text[start + len(prefix) : i - 1].strip())
            start = text.find(prefix, start + 1)
    return found[1] if found else None


def reference_answer(value: Any) -> str:
    """The answer part of a reference field: a number, a string, a written solution or a list of them."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("empty list")
        value = value[0] if len(value) == 1 else ", ".join(reference_answer(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"not a string or number: {value!r}")
    text = str(value).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    elif "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    if len(text) >= 2 and text[0] == text[-1] == "$":
        text = text.strip("$").strip()
    return text


def _pick(record: dict[str, Any], given: str | None, keys: Sequence[str], what: str, where: str) -> Any:
    if given is not None:
        if given not in record:
            raise DataError(f"{where}: no key {given!r} (keys: {', '.join(record)})")
        return record[given]
    for key in keys:
        if record.get(key) not in (None, ""):
            return record[key]
    raise DataError(
        f"{where}: no {what} under {', '.join(keys)} (keys: {', '.join(record)}); name it with --{what}-key"
    )


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not JSON: {exc}") from exc
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json file must hold an array of records")
        return list(enumerate(rows, 1))
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not JSON: {exc}") from exc
    return out


def load_problems(
    paths: Sequence[str | Path],
    problem_key: str | None = None,
    answer_key: str | None = None,
    limit: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> list[Problem]:
    """Every record of every file, shuffled (with ``seed``) before ``limit`` is applied when asked."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        for number, record in _records(path):
            where = f"{path}:{number}"
            if not isinstance(record, dict):
                raise DataError(f"{where}: a record must be a JSON object")
            problem = _pick(record, problem_key, PROBLEM_KEYS, "problem", where)
            if not isinstance(problem, str) or not problem.strip():
                raise DataError(f"{where}: the problem must be a non-empty string")
            try:
                reference = reference_answer(_pick(record, answer_key, ANSWER_KEYS, "answer", where))
            except ValueError as exc:
                raise DataError(f"{where}: unusable reference answer: {exc}") from exc
            ident = next((str(record[k]) for k in ID_KEYS if record.get(k) not in (None, "")), None)
            ident = ident or f"{path.stem}-{number}"
            if ident in seen:
                raise DataError(f"{where}: duplicate id {ident!r}")
            seen.add(ident)
            choices: list[Any] = next((record[k] for k in CHOICE_KEYS if isinstance(record.get(k), list)), [])
            problems.append(Problem(ident, problem.strip(), reference, tuple(str(c) for c in choices)))
    if shuffle:
        random.Random(seed).shuffle(problems)
    return problems[:limit] if limit is not None else problems


def prompt_text(problem: Problem, template: str) -> str:
    """The text submitted for a problem: ``{problem}`` in the template replaced (other braces, such as
    ``\\boxed{}``, are left alone), with lettered choices appended when the record has them."""
    body = problem.problem
    if problem.choices:
        letters = "ABCDEFGHIJ"
        body += "\n\n" + "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(problem.choices[:10]))
    return template.replace("{problem}", body)
