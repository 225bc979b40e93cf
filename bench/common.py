"""What every benchmark shares: the machine record, the prompt, timing, statistics, tables, JSON and plots.

Each subcommand writes one JSON file of the same outline (``machine``, ``config``, ``method``,
``results``) so that figures from different machines and runs can be compared without reading the code
that made them; the machine record carries the load average because other processes share the CPU here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path("bench/results")

PASSAGES = [
    "A regional rail company runs trains between five towns, Ashford, Brill, Caxton, Dunmore and Elston, "
    "which lie in that order along a single line. The track between neighbouring towns is 12, 18, 9 and 21 "
    "kilometres long. Passenger trains run at 60 kilometres per hour and stop for two minutes in every town; "
    "freight trains run at 40 kilometres per hour and never stop, but they must wait in a siding whenever a "
    "passenger train needs the same stretch of track.",
    "Each morning the first passenger train leaves Ashford at 6:00 and the first freight train leaves Elston "
    "at 6:10, heading the other way. Sidings exist only in Brill and Dunmore. The timetable planners want to "
    "know where the two trains meet, how long the freight train waits, and whether moving the freight "
    "departure by a few minutes would let both trains pass without anyone waiting at all.",
    "The company also sells weekly passes. A pass costs 34 pounds and covers unlimited travel between any "
    "two towns, while a single ticket costs 1.50 pounds plus 0.20 pounds per kilometre. Commuters who travel "
    "twice a day, five days a week, keep asking from which distance on the pass becomes the cheaper choice.",
]
QUESTION = (
    "Question: where and at what time do the first passenger train and the first freight train meet, and how "
    "many minutes does the freight train wait? Give the final answer in \\boxed{}."
)


def make_prompt(length: int, tokenizer: Any | None = None) -> str:
    """Real text of about ``length`` tokens (characters without a tokenizer): passages cycled and cut,
    then the question. The HTTP benchmark has no tokenizer of the server's model, hence characters."""

    def encode(text: str) -> list[Any]:
        return list(tokenizer.encode(text, add_special_tokens=False)) if tokenizer else list(text)

    def decode(units: list[Any]) -> str:
        return str(tokenizer.decode(units)) if tokenizer else "".join(units)

    budget = max(length - len(encode(QUESTION)), 0)
    text, i = "", 0
    while len(encode(text)) < budget:
        text += PASSAGES[i % len(PASSAGES)] + "\n\n"
        i += 1
    context = decode(encode(text)[:budget]).strip()
    return f"{context}\n\n{QUESTION}" if context else QUESTION


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores, load, GPU and library versions: the context a figure needs to be read."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "commit": COMMIT,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda
        )
    return info


def _commit() -> str | None:
    """The checkout's commit, with ``+dirty`` when files differ from it: the engine changes quickly."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


COMMIT = _commit()  # when the code was imported, which is the code that ran


def now(device: torch.device) -> float:
    """A timestamp after all queued device work: CUDA runs asynchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int, min_seconds: float = 0.05) -> float:
    """Median seconds per call over ``repeats`` samples, each looping long enough to dwarf the timer."""
    fn()
    start = now(device)
    fn()
    once = max(now(device) - start, 1e-7)
    inner = max(1, int(min_seconds / once))
    samples = []
    for _ in range(repeats):
        start = now(device)
        for _ in range(inner):
            fn()
        samples.append((now(device) - start) / inner)
    return statistics.median(samples)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, median and 99th percentile (nearest rank), as serving benchmarks report them."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    ordered = sorted(values)
    rank = max(0, math.ceil(0.99 * len(ordered)) - 1)
    return {"mean": statistics.fmean(ordered), "p50": statistics.median(ordered), "p99": ordered[rank]}


def measure_bandwidth(device: torch.device) -> float:
    """Memory bandwidth in bytes/s from one big device-to-device copy (bytes read plus bytes written)."""
    size = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, repeats=5, min_seconds=0.1)
    return 2 * size / seconds


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="JSON output (default under bench/results/)")
    p.add_argument("--plot", action="store_true", help="also draw a PNG beside the JSON")


def output_path(args: argparse.Namespace, stem: str) -> Path:
    return args.out if args.out else RESULTS / f"{stem}.json"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A rich table: first column left-aligned (names), numbers right-aligned."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 120)).print(table)


def log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[dim]{message}[/dim]")


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def fmt_summary(stats: dict[str, float], digits: int = 1) -> str:
    """``mean/p50/p99`` in one table cell."""
    return "/".join(fmt(stats[k], digits) for k in ("mean", "p50", "p99"))


def write_result(
    path: Path, device: torch.device, config: dict[str, Any], method: str, results: Any
) -> dict[str, Any]:
    """Write and return the JSON record; the method text says exactly what the numbers measure."""
    record = {
        "machine": machine_info(device),
        "config": config,
        "method": method.strip(),
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {path}")
    return record


def save_plot(draw: Callable[[Any], None], path: Path, panels: int = 1) -> Path:
    """Draw with ``draw(axes)`` into a headless matplotlib figure of ``panels`` side-by-side panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    draw(axes[0])
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    plt.close(fig)
    log(f"wrote {png}")
    return png
