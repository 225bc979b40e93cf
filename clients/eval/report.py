"""From records to results: accuracy per system and budget with 95% Wilson intervals, the terminal table,
``summary.json`` and the two plots (accuracy against the sequential budget, and against total tokens)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval for a proportion: sound at 0/n and n/n, where the normal one is not."""
    if n <= 0:
        return None
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0/n and n/n the bound is exactly 0 (or 1); rounding would leave it a hair inside.
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def _mean(values: Iterable[float | int | None]) -> float | None:
    got = [float(v) for v in values if v is not None]
    return sum(got) / len(got) if got else None


def cell(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy over the scored records (errors are counted apart: they are not wrong answers)."""
    scored = [r for r in records if r.get("verdict") in ("correct", "wrong")]
    correct = sum(1 for r in scored if r["verdict"] == "correct")
    ci = wilson(correct, len(scored))
    return {
        "n": len(scored),
        "correct": correct,
        "errors": sum(1 for r in records if r.get("verdict") == "error"),
        "accuracy": correct / len(scored) if scored else None,
        "ci95": list(ci) if ci else None,
        "mean_tokens": _mean(r.get("tokens") for r in scored),
        "mean_latency_s": _mean(r.get("latency_s") for r in scored),
    }


def summarize(
    records: Iterable[dict[str, Any]],
    systems: Sequence[str] | None = None,
    budgets: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """``{system: {"workers": W, "budgets": {"256": cell, ...}}}`` in the order systems were given (or
    first seen), budgets ascending."""
    by: dict[str, dict[int, list[dict[str, Any]]]] = {}
    workers: dict[str, int] = {}
    for name in systems or []:
        by[name] = {}
    for rec in records:
        name, budget = str(rec["system"]), int(rec["budget"])
        if (systems is not None and name not in systems) or (budgets is not None and budget not in budgets):
            continue
        by.setdefault(name, {}).setdefault(budget, []).append(rec)
        workers[name] = int(rec.get("workers") or 1)
    out: dict[str, dict[str, Any]] = {}
    for name, per_budget in by.items():
        keys = sorted(set(budgets or []) | set(per_budget))
        out[name] = {
            "workers": workers.get(name),
            "budgets": {str(b): cell(per_budget.get(b, [])) for b in keys},
        }
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(summary: dict[str, dict[str, Any]], title: str | None = None) -> Table:
    """Systems down, budgets across: accuracy (correct/scored) and mean total tokens under it."""
    budgets = sorted({int(b) for s in summary.values() for b in s["budgets"]})
    t = Table(title=title, header_style="bold")
    t.add_column("system", no_wrap=True)
    for b in budgets:
        t.add_column(f"{b} tok/worker", justify="right")
    t.add_column("errors", justify="right")
    for name, s in summary.items():
        row: list[Text | str] = [name]
        errors = 0
        for b in budgets:
            c = s["budgets"].get(str(b))
            if not c or (c["n"] == 0 and c["errors"] == 0):
                row.append("")
                continue
            errors = max(errors, c["errors"])
            line = Text(f"{_pct(c['accuracy'])} ({c['correct']}/{c['n']})")
            if c["mean_tokens"] is not None:
                line.append(f"\n{c['mean_tokens']:.0f} tok total", style="dim")
            row.append(line)
        row.append(Text(str(errors), style="red" if errors else "dim"))
        t.add_row(*row)
    return t


def running_line(summary: dict[str, dict[str, Any]]) -> str:
    """The accuracy so far at each system's largest budget, for the progress display."""
    parts = []
    for name, s in summary.items():
        if not s["budgets"]:
            continue
        top = s["budgets"][max(s["budgets"], key=int)]
        if top["n"]:
            parts.append(f"{name} {_pct(top['accuracy'])}")
    return "  ".join(parts)


class PlotsUnavailable(RuntimeError):
    pass


def plot(summary: dict[str, dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """``accuracy_vs_budget.png`` and ``accuracy_vs_tokens.png``: one line per system, 95% Wilson bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        raise PlotsUnavailable(
            "plots need matplotlib: pip install 'hogwild-server[eval]' (or matplotlib); "
            "results.jsonl and summary.json are written without it"
        ) from exc
    paths = []
    for x_key, xlabel, fname in (
        ("budget", "sequential budget (generated tokens per worker)", "accuracy_vs_budget.png"),
        (
            "mean_tokens",
            "total generated tokens per problem (all workers / samples)",
            "accuracy_vs_tokens.png",
        ),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
        drawn = 0
        ticks: set[int] = set()
        for i, (name, s) in enumerate(summary.items()):
            # Systems share the budgets: a small sideways dodge keeps their interval bars apart.
            dodge = 2 ** (0.025 * (i - (len(summary) - 1) / 2)) if x_key == "budget" else 1.0
            xs, ys, lo, hi = [], [], [], []
            for b, c in sorted(s["budgets"].items(), key=lambda kv: int(kv[0])):
                x = int(b) if x_key == "budget" else c["mean_tokens"]
                if c["accuracy"] is None or x is None:
                    continue
                if x_key == "budget":
                    ticks.add(int(b))
                xs.append(x * dodge)
                ys.append(100 * c["accuracy"])
                lo.append(max(0.0, 100 * (c["accuracy"] - c["ci95"][0])))
                hi.append(max(0.0, 100 * (c["ci95"][1] - c["accuracy"])))
            if not xs:
                continue
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
            drawn += 1
        if drawn:
            ax.set_xscale("log", base=2)
            if ticks:
                ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
                ax.minorticks_off()
            else:
                ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.legend(fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%), 95% Wilson interval")
        ax.set_ylim(-2, 102)
        ax.grid(True, alpha=0.3)
        if title:
            ax.set_title(title, fontsize=10)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
