"""The systems compared, by name, and the job bodies each submits for one problem.

- ``hogwild-w{W}-{layout}-{instructions}``: one Hogwild! job, W workers sharing one cache;
- ``plain``: the baseline, one ordinary chat sequence (``layout: "plain"``, one worker);
- ``sc-w{W}``: self-consistency, W independent plain jobs sampled with distinct seeds at a temperature
  above 0, majority vote per budget.

Every job asks for the largest budget as ``max_tokens`` and for every budget as a ``checkpoint``, so one
job per problem (W for self-consistency) yields the answer at each budget.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LAYOUTS = ("combined", "interleaved", "contiguous")
_HOGWILD = re.compile(r"^hogwild-w(\d+)-([a-z]+)-([A-Za-z0-9_.-]+)$")
_SC = re.compile(r"^sc-w(\d+)$")


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # "hogwild", "plain" or "sc"
    workers: int  # workers per job (hogwild), or samples (sc); 1 for plain
    layout: str = "plain"
    instructions: str | None = None

    @property
    def jobs_per_problem(self) -> int:
        return self.workers if self.kind == "sc" else 1

    @property
    def parallel(self) -> int:
        """Sequences generated at once for one problem: workers of a job or independent samples."""
        return self.workers


def parse_system(name: str) -> System:
    if name == "plain":
        return System("plain", "plain", 1)
    m = _SC.match(name)
    if m and int(m.group(1)) >= 1:
        return System(name, "sc", int(m.group(1)))
    m = _HOGWILD.match(name)
    if m and int(m.group(1)) >= 1:
        if m.group(2) not in LAYOUTS:
            raise ValueError(f"system {name!r}: layout {m.group(2)!r} is not one of {', '.join(LAYOUTS)}")
        return System(name, "hogwild", int(m.group(1)), m.group(2), m.group(3))
    raise ValueError(
        f"unknown system {name!r}: write plain, sc-w<N> or hogwild-w<N>-<layout>-<instructions> "
        "(e.g. hogwild-w2-combined-full)"
    )


def default_systems(
    workers: Sequence[int], layouts: Sequence[str], instructions: Sequence[str]
) -> list[System]:
    """``plain``, then Hogwild for every workers x layout x preset, then self-consistency per W > 1."""
    names = ["plain"]
    names += [f"hogwild-w{w}-{lay}-{ins}" for w in workers for lay in layouts for ins in instructions]
    names += [f"sc-w{w}" for w in workers if w > 1]
    return [parse_system(n) for n in dict.fromkeys(names)]


def select_systems(patterns: Sequence[str] | None, candidates: Sequence[System]) -> list[System]:
    """``--systems``: names (any valid name, whether or not the flags generate it) or shell patterns
    over the generated ones (``'hogwild-*'``), in the order given."""
    if not patterns:
        return list(candidates)
    chosen: dict[str, System] = {}
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            hits = [s for s in candidates if fnmatch.fnmatchcase(s.name, pattern)]
            if not hits:
                raise ValueError(
                    f"--systems {pattern!r} matches none of {', '.join(s.name for s in candidates)}"
                )
            chosen.update((s.name, s) for s in hits)
        else:
            system = parse_system(pattern)
            chosen[system.name] = system
    return list(chosen.values())


def job_seed(base: int, problem_id: str, system: str, sample: int) -> int:
    """A seed of its own for every (problem, system, sample): runs are reproducible and samples differ."""
    digest = hashlib.sha256(f"{base}\0{problem_id}\0{system}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:6], "big")


def job_bodies(
    system: System,
    prompt: str,
    problem_id: str,
    budgets: Sequence[int],
    *,
    seed: int = 0,
    temperature: float | None = None,
    sc_temperature: float = 0.6,
    top_p: float | None = None,
    top_k: int | None = None,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The ``POST /v1/jobs`` bodies for one problem: one, or W for self-consistency.

    ``None`` sampling values are left out, so the server's defaults (the model's generation_config)
    apply; self-consistency always samples, at ``sc_temperature`` unless ``temperature`` is above 0."""
    common: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max(budgets),
        "checkpoints": sorted(set(budgets)),
        "top_p": top_p,
        "top_k": top_k,
        **(extra or {}),
    }
    if system.kind == "hogwild":
        body = {**common, "workers": system.workers, "layout": system.layout}
        body.update(instructions=system.instructions, temperature=temperature)
        body["seed"] = job_seed(seed, problem_id, system.name, 0)
        return [body]
    plain = {**common, "workers": 1, "layout": "plain", "temperature": temperature}
    if system.kind == "plain":
        return [{**plain, "seed": job_seed(seed, problem_id, system.name, 0)}]
    sampled = temperature if temperature is not None and temperature > 0 else sc_temperature
    return [
        {**plain, "temperature": sampled, "seed": job_seed(seed, problem_id, "sc", k)}
        for k in range(system.workers)
    ]
