"""``hogwild eval``: accuracy of Hogwild! and its baselines against the token budget, over the HTTP API.

Modules: ``data`` (problems and references from JSONL), ``systems`` (what is compared and the jobs each
submits), ``scoring`` (is an answer right; the equivalence self-consistency votes with), ``runner`` (jobs
in flight, answers at every checkpoint, resumable records), ``report`` (accuracy with Wilson intervals,
table, summary, plots) and ``cli``. docs/EVAL.md describes the command.
"""

from clients.eval.cli import main

__all__ = ["main"]
