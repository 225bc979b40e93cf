"""``python -m engine "problem" --workers 2``: watch the workers think, live, in the terminal."""

from __future__ import annotations

import argparse
import sys

from rich.columns import Columns
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from engine.engine import DTYPES, Engine
from engine.protocol import DEVICE_HELP, DTYPE_HELP, MODEL_HELP, Event, add_job_flags, flag_help, job_params

COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__)
    p.add_argument("problem", help="the problem the workers solve together")
    p.add_argument("--model", default=None, help=flag_help(MODEL_HELP, None))
    p.add_argument("--device", default="cpu", help=flag_help(DEVICE_HELP, "cpu"))
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help=flag_help(DTYPE_HELP, None))
    add_job_flags(p)
    p.add_argument(
        "--view",
        choices=("columns", "stream"),
        default="columns",
        help=flag_help("side by side columns, or one interleaved stream of finished steps", "columns"),
    )
    return p.parse_args(argv)


def columns(names: list[str], texts: list[str], lines: int) -> Columns:
    """One panel per worker showing the tail of its text: the terminal cannot hold it all."""
    panels = []
    for i, (name, text) in enumerate(zip(names, texts, strict=False)):
        tail = "\n".join(text.splitlines()[-lines:])
        panels.append(Panel(Text(tail), title=name, border_style=COLORS[i % len(COLORS)]))
    return Columns(panels, equal=True, expand=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    console.print("[dim]loading model ...[/dim]")
    eng = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    try:
        job = eng.submit(args.problem, **job_params(args))
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    names = [w.name for w in job.workers]
    texts = [""] * len(job.workers)
    done: Event | None = None

    def handle(ev: Event) -> None:
        nonlocal done
        if ev.type == "token":
            texts[ev.data["worker"]] += ev.data["text"]
        elif ev.type == "step" and args.view == "stream":
            color = COLORS[ev.data["worker"] % len(COLORS)]
            console.print(Text(ev.data["text"].rstrip(), style=color))
        elif ev.type == "done":
            done = ev

    if args.view == "columns":
        height = max(8, console.size.height - 6)
        with Live(columns(names, texts, height), console=console, refresh_per_second=8) as live:
            while not job.ended:
                for ev in eng.step():
                    handle(ev)
                live.update(columns(names, texts, height))
    else:
        while not job.ended:
            for ev in eng.step():
                handle(ev)
        for i, text in enumerate(texts):  # what was still in progress at the end
            tail = text[sum(len(h["text"]) for h in job.history if h["worker"] == i) :]
            if tail.strip():
                console.print(Text(tail.rstrip(), style=COLORS[i % len(COLORS)]))
    reason = done.data["finish_reason"] if done else job.finish_reason
    console.print(
        f"\n[bold]answer:[/bold] {job.answer if job.answer is not None else '(none)'}  [dim]({reason})[/dim]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
