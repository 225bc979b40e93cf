"""Is an answer right? Four scorers, each also the equivalence that self-consistency votes with.

``math`` (the default) hands both sides to Math-Verify (``math-verify`` on PyPI, the checker open-r1 and
lighteval use): it parses LaTeX and plain expressions into sympy and compares them symbolically and
numerically, so ``\\frac{1}{2}`` equals ``0.5`` and ``2\\sqrt{2}`` equals ``\\sqrt{8}``. Before that, the
answer and the reference are normalized here: ``\\text{}`` unwrapped, trailing unit words (``5 apples``,
``3 km/h``) and dollar signs dropped. ``numeric`` reads one number from each side and compares within a
relative tolerance; ``exact`` compares normalized strings; ``choice`` compares multiple-choice letters.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

SCORERS = ("math", "numeric", "exact", "choice")
MAX_ANSWER_CHARS = 400  # a runaway answer is wrong anyway; parsing it symbolically could take long

_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textit|textrm|mbox|mathrm|operatorname)\s*\{([^{}]*)\}")
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
# A number (or a simple fraction) followed only by words: the words are a unit. Single math words stay.
_UNIT_TAIL = re.compile(
    r"^\s*(?P<num>(?:" + _NUMBER + r")(?:\s*/\s*\d+)?|\\d?frac\{[^{}]+\}\{[^{}]+\})"
    r"\s*(?P<unit>[A-Za-z][A-Za-z\s./^0-9-]*)$"
)
_MATH_WORDS = {"pi", "i", "e", "sqrt", "infty", "x", "y", "n"}
_FRAC = re.compile(r"^\\d?frac\{([^{}]+)\}\{([^{}]+)\}$|^\\d?frac(\d)(\d)$")
_CHOICE = re.compile(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])")


def normalize(text: str | None) -> str:
    """The answer with wrappers, units and punctuation that never change its value taken off."""
    if text is None:
        return ""
    s = str(text).strip()[:MAX_ANSWER_CHARS]
    s = re.sub(r"^\\boxed\{(.*)\}$", r"\1", s, flags=re.S)
    if len(s) >= 2 and s[0] == s[-1] == "$":
        s = s.strip("$").strip()
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", " ")
    s = s.replace("\\;", " ").replace("\\ ", " ").replace("~", " ")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)  # degrees
    for _ in range(3):  # nested \text{\textbf{..}}
        s = _TEXT_MACRO.sub(lambda m: " " + m.group(1) + " ", s)
    s = re.sub(r"\\?\$", "", s)  # currency, written $12 or \$12
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    m = _UNIT_TAIL.match(s)
    if m and m.group("unit").strip().lower() not in _MATH_WORDS:
        s = m.group("num").strip()
    return s


def to_number(text: str | None) -> float | None:
    """One number read from an answer: a plain or comma-grouped number, a fraction (``3/4``,
    ``\\frac{3}{4}``), a percentage (``50%`` is 50), else the last number written; None if there is none."""
    s = normalize(text).replace("\\%", "%").rstrip("%").strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    m = _FRAC.match(s)
    if m:
        num, den = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
        a, b = to_number(num), to_number(den)
        return a / b if a is not None and b is not None and b != 0 else None
    plain = s.replace(",", "") if re.fullmatch(_NUMBER, s) else s
    try:
        return float(Fraction(plain.replace(" ", ""))) if "/" in plain else float(plain)
    except (ValueError, ZeroDivisionError):
        pass
    found = _NUMBER_RE.findall(s)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def choice_letter(text: str | None) -> str | None:
    """The multiple-choice letter of an answer: ``B``, ``(B)``, ``B) 42``, ``\\text{B}``, ``answer: B``."""
    s = normalize(text)
    if not s:
        return None
    if re.fullmatch(r"\(?[A-Ja-j]\)?[.):]?", s):
        return s.strip("().:").upper()
    m = re.match(r"^\(?([A-J])[).:\s]", s)  # "B) 42", "C. twelve"
    if m:
        return m.group(1)
    found = _CHOICE.findall(s)
    return found[-1] if found else None


def exact_key(text: str | None) -> str:
    return re.sub(r"\s+", "", normalize(text)).lower()


class ScorerUnavailable(RuntimeError):
    """A scorer whose library is not installed; the message says what to install."""


@dataclass(frozen=True)
class Scorer:
    """``correct(answer, reference)``; ``same(a, b)`` is the equivalence a majority vote groups by."""

    name: str
    correct: Callable[[str | None, str | None], bool]

    def same(self, a: str | None, b: str | None) -> bool:
        return a is not None and b is not None and self.correct(a, b)


def numeric_equal(answer: str | None, reference: str | None, rel_tol: float = 1e-6) -> bool:
    a, b = to_number(answer), to_number(reference)
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


def exact_equal(answer: str | None, reference: str | None) -> bool:
    return answer is not None and reference is not None and exact_key(answer) == exact_key(reference)


def choice_equal(answer: str | None, reference: str | None) -> bool:
    a, b = choice_letter(answer), choice_letter(reference)
    return a is not None and a == b


def _math_verify() -> tuple[Any, Any]:
    try:
        from math_verify import parse, verify
    except ImportError as exc:
        raise ScorerUnavailable(
            "the math scorer needs Math-Verify: pip install 'hogwild-server[eval]' "
            "(or 'math-verify[antlr4_13_2]'), or pick --scorer numeric"
        ) from exc
    return parse, verify


def _parsed(parse: Any, s: str, timeout: int | None) -> Sequence[Any]:
    # As LaTeX first ("2\sqrt{2}" is 2 when read as a plain expression), then as written.
    got = parse(f"${s}$", parsing_timeout=timeout)
    return got if got else parse(s, parsing_timeout=timeout)


def math_equal(answer: str | None, reference: str | None, rel_tol: float = 1e-6) -> bool:
    if answer is None or reference is None:
        return False
    a, b = normalize(answer), normalize(reference)
    if not a or not b:
        return False
    if exact_key(a) == exact_key(b):
        return True
    x, y = to_number(a), to_number(b)
    simple = re.compile(r"[-+]?[\d.,]+")
    if x is not None and y is not None and simple.fullmatch(a) and simple.fullmatch(b):
        return math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)  # both plain numbers: no sympy needed
    parse, verify = _math_verify()
    # Math-Verify bounds its work with signal.alarm, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold, pred = _parsed(parse, b, timeout), _parsed(parse, a, timeout)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=timeout))


def make_scorer(name: str, rel_tol: float = 1e-6) -> Scorer:
    if name == "math":
        _math_verify()  # fail at start, with the message, rather than at the first answer
        return Scorer(name, lambda a, r: math_equal(a, r, rel_tol))
    if name == "numeric":
        return Scorer(name, lambda a, r: numeric_equal(a, r, rel_tol))
    if name == "exact":
        return Scorer(name, exact_equal)
    if name == "choice":
        return Scorer(name, choice_equal)
    raise ValueError(f"unknown scorer {name!r} (one of {', '.join(SCORERS)})")


def majority_vote(answers: Sequence[str | None], scorer: Scorer) -> tuple[str | None, int]:
    """The answer most samples agree on (by the scorer's equivalence) and how many gave it.

    Samples without an answer do not vote; a tie goes to the group whose first member came first, so the
    vote is deterministic for a given order of samples."""
    groups: list[list[str]] = []
    for answer in answers:
        if answer is None or not normalize(answer):
            continue
        for group in groups:
            if scorer.same(answer, group[0]):
                group.append(answer)
                break
        else:
            groups.append([answer])
    if not groups:
        return None, 0
    best = max(groups, key=len)  # max keeps the first of equal lengths
    return best[0], len(best)
