"""``hogwild "problem" --workers 4``: ask a running Hogwild! server and watch its workers think, live.

Also ``hogwild jobs`` (recent jobs), ``hogwild get ID`` and ``hogwild cancel ID``. The server address and key
come from ``--url``/``--api-key`` or the environment (``HOGWILD_URL``, ``HOGWILD_API_KEY``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from clients.client import Event, HogwildClient, HogwildError
from engine.protocol import ENDED, add_job_flags, flag_help, job_params

COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")
COMMANDS = ("jobs", "get", "cancel")
DEFAULT_URL = "http://127.0.0.1:8000"
MIN_COLUMN = 24  # the narrowest worker column: more workers than fit across go on more rows


def _common(p: argparse.ArgumentParser) -> None:
    url, key = os.environ.get("HOGWILD_URL"), os.environ.get("HOGWILD_API_KEY")
    p.add_argument(
        "--url", default=url or DEFAULT_URL, help=flag_help("the server, or HOGWILD_URL", url or DEFAULT_URL)
    )
    p.add_argument(
        "--api-key",
        default=key,
        help=flag_help("the server's API key, or HOGWILD_API_KEY", "HOGWILD_API_KEY's" if key else "none"),
    )
    p.add_argument(
        "--json", action="store_true", help=flag_help("print the job object(s) as JSON, nothing else", False)
    )


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hogwild",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="other commands: hogwild jobs | hogwild get ID | hogwild cancel ID (each with --help)\n"
        "job options left unset are the server's: the defaults shown are the engine's",
    )
    p.add_argument("problem", help="the problem the workers solve together")
    _common(p)
    add_job_flags(p)  # every default None: options left out are the server's, never contradicted
    view = p.add_mutually_exclusive_group()
    for name, what in (
        ("columns", "one live column per worker"),
        ("stream", "finished steps as they happen"),
    ):
        view.add_argument(
            "--" + name, dest="view", action="store_const", const=name, help=flag_help(what, "--columns")
        )
    p.set_defaults(view="columns")
    return p


def command_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hogwild")
    sub = p.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("jobs", help="recent jobs, newest first"))
    for name in ("get", "cancel"):
        sp = sub.add_parser(name, help=f"{name} one job")
        sp.add_argument("id", help="the job's id (hogwild jobs lists them)")
        _common(sp)
    return p


class Watch:
    """What the terminal shows of a running job: each worker's text (forced text dimmed) and speed."""

    def __init__(self, job: dict[str, Any], console: Console, view: str) -> None:
        self.console = console
        self.view = view
        count = int(job.get("options", {}).get("workers") or len(job.get("workers") or []) or 1)
        known = {w["index"]: w["name"] for w in job.get("workers") or []}
        self.names = [known.get(i, f"worker {i}") for i in range(count)]
        self.texts = [Text() for _ in range(count)]
        self.generated = [0] * count
        self.started: list[float | None] = [None] * count
        self.printed = [0] * count  # characters of each worker already shown in stream view
        self.done: dict[str, Any] | None = None
        self.answer: str | None = None

    def _worker(self, index: int) -> int:
        while index >= len(self.texts):  # a server that reports more workers than it announced
            self.names.append(f"worker {len(self.texts)}")
            self.texts.append(Text())
            self.generated.append(0)
            self.started.append(None)
            self.printed.append(0)
        return index

    def handle(self, event: Event) -> None:
        d = event.data
        if event.type == "token":
            w = self._worker(int(d["worker"]))
            self.texts[w].append(d["text"], style="dim italic" if d.get("forced") else None)
            if not d.get("forced"):
                self.generated[w] += 1
                self.started[w] = self.started[w] or time.monotonic()
        elif event.type == "step" and self.view == "stream":
            w = self._worker(int(d["worker"]))
            self.console.print(Text(d["text"].rstrip(), style=COLORS[w % len(COLORS)]), soft_wrap=True)
            self.printed[w] = len(self.texts[w].plain)
        elif event.type == "quick_check" and self.view == "stream":
            name = self.names[self._worker(int(d["worker"]))]
            self.console.print(Text(f"[quick check for {name}, step {d.get('step')}]", style="dim"))
        elif event.type == "checkpoint":
            line = f"[checkpoint at {d.get('budget')} tokens per worker: {d.get('answer')!r}]"
            self.console.print(Text(line, style="dim"))
        elif event.type == "final":
            self.answer = d.get("answer")
        elif event.type == "error":
            self.console.print(Text(f"error: {d.get('message')}", style="bold red"))
        elif event.type == "done":
            self.done = d

    def rate(self, w: int) -> str:
        start = self.started[w]
        elapsed = time.monotonic() - start if start else 0.0
        return (
            f"{self.generated[w]} tok, {self.generated[w] / elapsed:.1f} tok/s" if elapsed > 0 else "waiting"
        )

    def __rich__(self) -> Table:
        return self.columns()

    def columns(self) -> Table:
        """One panel per worker, laid out from the terminal's size and the number of workers alone: the
        width split evenly (on more rows when a column would be narrower than MIN_COLUMN), every panel the
        same height, each worker's text wrapped inside its own column and showing the tail that fits. So
        the columns stay put for the whole job, however the texts grow (rich's Columns sized them by
        their content: they reflowed while streaming, and cut a panel to "...")."""
        count = len(self.texts)
        width, height = self.console.size
        across = max(1, min(count, width // MIN_COLUMN))
        rows = -(-count // across)
        widths = [width // across + (1 if c < width % across else 0) for c in range(across)]
        tall = max(4, (height - 1) // rows)  # one line spare: a taller frame would be cropped to "..."
        grid = Table.grid(padding=0)
        for w in widths:
            grid.add_column(width=w, no_wrap=True)
        for first in range(0, count, across):
            cells = range(first, min(count, first + across))
            grid.add_row(*(self.panel(w, widths[w - first], tall) for w in cells))
        return grid

    def panel(self, w: int, width: int, height: int) -> Panel:
        inner, rows = max(1, width - 4), max(1, height - 2)  # inside the borders and the padding
        kept: list[Text] = []
        for line in reversed(self.texts[w].split("\n")):  # only the last lines that can show are wrapped
            kept[:0] = line.wrap(self.console, inner, overflow="fold") or [Text()]
            if len(kept) >= rows:
                break
        body = Text("\n", overflow="fold").join(kept[-rows:])
        color = COLORS[w % len(COLORS)]
        return Panel(
            body,
            title=self.names[w],
            subtitle=self.rate(w),
            border_style=color,
            width=width,
            height=height,
        )

    def flush_stream(self) -> None:
        """At the end, the text still in progress (not yet a finished step) of each worker.

        Stream output is soft-wrapped (left to the terminal) so that it can be copied and grepped whole."""
        for w, text in enumerate(self.texts):
            tail = text.plain[self.printed[w] :]
            if tail.strip():
                self.console.print(Text(tail.rstrip(), style=COLORS[w % len(COLORS)]), soft_wrap=True)


def run(args: argparse.Namespace, client: HogwildClient, console: Console) -> int:
    job = client.submit(args.problem, **job_params(args))
    try:
        if args.json:
            for _ in client.events(job["id"]):
                pass
        else:
            watch = Watch(job, console, args.view)
            console.print(f"[dim]{job['id']} on {job.get('model', '?')}[/dim]")
            if args.view == "columns":
                # Live renders `watch` at its own pace, so a fast stream costs one layout per refresh.
                with Live(watch, console=console, refresh_per_second=8):
                    for event in client.events(job["id"]):
                        watch.handle(event)
            else:
                for event in client.events(job["id"]):
                    watch.handle(event)
                watch.flush_stream()
    except KeyboardInterrupt:
        # Leaving without cancelling would keep the server working for no one.
        job = client.cancel(job["id"])
        console.print(f"[yellow]cancelled {job['id']}[/yellow]")
        return 130
    final = client.get(job["id"])
    if args.json:
        print(json.dumps(final, indent=2))
    else:
        show_result(final, console)
    return 0 if final.get("status") == "finished" else 1


def show_result(job: dict[str, Any], console: Console) -> None:
    answer = job.get("answer")
    line = Text("answer: ", style="bold")
    line.append(
        answer if answer is not None else "(none)", style="bold green" if answer is not None else "dim"
    )
    line.append(f"  ({job.get('finish_reason')})", style="dim")
    console.print(line)
    if job.get("error"):
        console.print(Text(f"error: {job['error']}", style="bold red"))
    usage, timings = job.get("usage") or {}, job.get("timings") or {}
    if usage:
        parts = [f"{k.removesuffix('_tokens')} {v}" for k, v in usage.items()]
        if timings.get("duration_s") is not None:
            parts.append(f"{timings['duration_s']:.1f} s")
        console.print(Text("tokens: " + ", ".join(parts), style="dim"))


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(header_style="bold")
    table.add_column("id", no_wrap=True)  # copied into `hogwild get`: it must stay whole
    for name in ("status", "workers", "finish"):
        table.add_column(name)
    table.add_column("answer", max_width=30, overflow="ellipsis", no_wrap=True)
    table.add_column("created")
    for job in jobs:
        created = (job.get("timings") or {}).get("created")
        table.add_row(
            job["id"],
            job.get("status", ""),
            str((job.get("options") or {}).get("workers", "")),
            job.get("finish_reason") or "",
            Text(str(job["answer"])) if job.get("answer") is not None else "",
            time.strftime("%H:%M:%S", time.localtime(created)) if created else "",
        )
    return table


def show_job(job: dict[str, Any], console: Console) -> None:
    console.print(Text(f"{job['id']}  {job.get('status')}  {job.get('model', '')}", style="bold"))
    for worker in job.get("workers") or []:
        color = COLORS[int(worker.get("index", 0)) % len(COLORS)]
        subtitle = f"{worker.get('tokens', 0)} tokens, {worker.get('finish_reason') or 'running'}"
        console.print(
            Panel(
                Text(worker.get("text", "")), title=worker.get("name"), subtitle=subtitle, border_style=color
            )
        )
    if job.get("status") in ENDED:
        show_result(job, console)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "eval":  # its own options and output (clients/eval, docs/EVAL.md)
        from clients.eval import main as eval_main

        return eval_main(argv[1:])
    is_command = bool(argv) and argv[0] in COMMANDS
    args = (command_parser() if is_command else run_parser()).parse_args(argv)
    console = Console()
    with HogwildClient(args.url, api_key=args.api_key) as client:
        try:
            if not is_command:
                return run(args, client, console)
            if args.command == "jobs":
                jobs = client.list()
                if args.json:
                    print(json.dumps(jobs, indent=2))
                else:
                    console.print(jobs_table(jobs))
                return 0
            job = client.get(args.id) if args.command == "get" else client.cancel(args.id)
            if args.json:
                print(json.dumps(job, indent=2))
            else:
                show_job(job, console)
            return 0
        except HogwildError as exc:
            Console(stderr=True).print(Text(f"error: {exc}", style="bold red"))
            return 1


if __name__ == "__main__":
    sys.exit(main())
