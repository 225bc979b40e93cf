"""``hogwild eval``: accuracy against the sequential token budget, Hogwild! against its baselines.

Runs every problem of a JSONL file under each system (Hogwild! with W workers in a layout and an
instructions preset, the plain single worker, self-consistency over W samples) on a running server, and
reads each job's answer at every budget from the server's answer checkpoints: one job per problem and
system, not one per budget. Writes results.jsonl (appended as it goes; --resume continues an interrupted
run), summary.json and two plots into --out. docs/EVAL.md has the details and the paper's recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from clients.client import HogwildClient, HogwildError
from clients.eval import report
from clients.eval.data import SAMPLE, DataError, load_problems
from clients.eval.runner import RESULTS, ClientPool, FatalError, Run, read_results
from clients.eval.runner import Progress as RunProgress
from clients.eval.scoring import SCORERS, ScorerUnavailable, make_scorer
from clients.eval.systems import LAYOUTS, default_systems, select_systems

DEFAULT_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."
SUMMARY = "summary.json"
CONFIG = "config.json"
# What changes the answers: resuming with other values mixes two experiments in one file.
RUN_DEFINING = ("model", "template", "temperature", "sc_temperature", "top_p", "top_k", "seed", "job_options")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hogwild eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default=os.environ.get("HOGWILD_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("HOGWILD_API_KEY"))
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="+",
        default=[str(SAMPLE)],
        help="JSONL (or JSON array) files (default: the sample set)",
    )
    g.add_argument("--problem-key", help="key of the problem (default: problem, question or prompt)")
    g.add_argument("--answer-key", help="key of the reference (default: answer, solution or final_answer)")
    g.add_argument("--limit", type=int, help="the first N problems (after --shuffle)")
    g.add_argument("--shuffle", action="store_true")
    g.add_argument("--seed", type=int, default=0, help="shuffle order and every job's seed")
    g.add_argument(
        "--prompt-template",
        default=DEFAULT_TEMPLATE,
        help="text submitted; {problem} is replaced (default asks for a \\boxed{} answer)",
    )
    g = p.add_argument_group("systems")
    g.add_argument("--workers", type=int, nargs="+", default=[2], help="Hogwild workers (and sc samples)")
    g.add_argument("--layout", nargs="+", default=["combined"], choices=LAYOUTS)
    g.add_argument("--instructions", nargs="+", default=["full"], help="presets: full, short, none, ...")
    g.add_argument(
        "--systems",
        nargs="+",
        help="names or patterns: plain, sc-w4, hogwild-w2-combined-full, 'hogwild-*' "
        "(default: plain, every hogwild combination, sc-wW for each W > 1)",
    )
    g.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024, 2048], help="tokens per worker")
    g.add_argument("--temperature", type=float, help="all systems (default: the model's generation_config)")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument(
        "--sc-temperature", type=float, default=0.6, help="self-consistency's, unless --temperature > 0"
    )
    g.add_argument(
        "--job-options",
        type=json.loads,
        default={},
        help="more job fields as JSON: '{\"quick_check_every\": 0}'",
    )
    g = p.add_argument_group("scoring")
    g.add_argument("--scorer", choices=SCORERS, default="math")
    g.add_argument("--tolerance", type=float, default=1e-6, help="relative, for numbers (math, numeric)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="eval-results", help="output folder")
    g.add_argument("--concurrency", type=int, default=4, help="jobs in flight (the server batches them)")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="skip what results.jsonl already holds")
    again.add_argument("--overwrite", action="store_true", help="start results.jsonl afresh")
    g.add_argument(
        "--report-only", action="store_true", help="no jobs: summary, table and plots from results.jsonl"
    )
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no live display")
    return p


def _check(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    if any(b < 1 for b in args.budgets):
        p.error("--budgets must be positive")
    if any(w < 1 for w in args.workers):
        p.error("--workers must be positive")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if not isinstance(args.job_options, dict):
        p.error("--job-options must be a JSON object")
    clash = {"prompt", "messages", "max_tokens", "checkpoints", "workers", "layout", "stream"} & set(
        args.job_options
    )
    if clash:
        p.error(f"--job-options cannot set {', '.join(sorted(clash))}: the systems and --budgets do")
    if args.sc_temperature <= 0:
        p.error("--sc-temperature must be above 0: independent samples need sampling")
    if "{problem}" not in args.prompt_template:
        p.error("--prompt-template must contain {problem}")


def _server_model(url: str, api_key: str | None) -> str | None:
    with HogwildClient(url, api_key=api_key, timeout=10.0) as client:
        try:
            models = client.models()
        except HogwildError as exc:
            if exc.status in (401, 403):
                raise FatalError(f"the server refused the API key ({exc}); pass --api-key") from exc
            raise FatalError(f"cannot use {url}: {exc}") from exc
    return str(models[0]["id"]) if models else None


def _report(
    out_dir: Path,
    records: list[dict[str, Any]],
    systems: list[str] | None,
    budgets: list[int] | None,
    extra: dict[str, Any],
    console: Console,
    plots: bool,
) -> dict[str, Any]:
    summary = report.summarize(records, systems, budgets)
    doc = {**extra, "systems": summary}
    (out_dir / SUMMARY).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    config = extra.get("config") or {}
    files = ", ".join(Path(d).name for d in config.get("data") or [])
    problems = len({r["problem_id"] for r in records})
    title = f"{config.get('model') or 'results'}: {files + ', ' if files else ''}{problems} problems"
    console.print(report.table(summary, title=title))
    written = [out_dir / RESULTS, out_dir / SUMMARY]
    if plots:
        try:
            written += report.plot(summary, out_dir, title=title)
        except report.PlotsUnavailable as exc:
            console.print(Text(str(exc), style="yellow"))
    console.print(Text("wrote " + ", ".join(str(p) for p in written), style="dim"))
    return doc


def main(argv: list[str] | None = None, console: Console | None = None) -> int:
    p = parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    _check(args, p)
    console = console or Console()
    err = Console(stderr=True)
    out_dir = Path(args.out)
    budgets = sorted(set(args.budgets))
    if args.report_only:
        records = list(read_results(out_dir / RESULTS).values())
        if not records:
            err.print(Text(f"error: no records in {out_dir / RESULTS}", style="bold red"))
            return 1
        _report(out_dir, records, None, None, {"report_only": True}, console, not args.no_plots)
        return 0
    try:
        scorer = make_scorer(args.scorer, args.tolerance)
        problems = load_problems(
            args.data, args.problem_key, args.answer_key, args.limit, args.shuffle, args.seed
        )
        systems = select_systems(args.systems, default_systems(args.workers, args.layout, args.instructions))
    except (ScorerUnavailable, DataError, ValueError) as exc:
        err.print(Text(f"error: {exc}", style="bold red"))
        return 2
    if not problems:
        err.print(Text("error: no problems to run", style="bold red"))
        return 2
    results_path = out_dir / RESULTS
    if results_path.is_file() and results_path.stat().st_size and not (args.resume or args.overwrite):
        err.print(
            Text(
                f"error: {results_path} exists: --resume to continue it, --overwrite to start again",
                style="bold red",
            )
        )
        return 2
    try:
        model = _server_model(args.url, args.api_key)
    except FatalError as exc:
        err.print(Text(f"error: {exc}", style="bold red"))
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        results_path.write_text("", encoding="utf-8")
    config = {
        "url": args.url,
        "model": model,
        "data": [str(d) for d in args.data],
        "problems": len(problems),
        "systems": [s.name for s in systems],
        "budgets": budgets,
        "scorer": args.scorer,
        "tolerance": args.tolerance,
        "template": args.prompt_template,
        "temperature": args.temperature,
        "sc_temperature": args.sc_temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "job_options": args.job_options,
        "concurrency": args.concurrency,
    }
    config_path = out_dir / CONFIG
    if args.resume and config_path.is_file():
        try:
            before = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError:
            before = {}
        changed = [k for k in RUN_DEFINING if k in before and before[k] != config[k]]
        if changed:
            err.print(
                Text(f"warning: resuming with other {', '.join(changed)} than the first run", style="yellow")
            )
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    names = [s.name for s in systems]
    ids = {pr.id for pr in problems}
    previous = (
        [r for r in read_results(results_path).values() if r["problem_id"] in ids and r["system"] in names]
        if args.resume
        else []
    )
    progress_bar = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("jobs"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        auto_refresh=False,
    )
    task = progress_bar.add_task("eval", total=None)
    live_table: list[Any] = [Text(""), Text("")]  # the running accuracy, the table so far

    def render() -> Group:
        return Group(progress_bar, *live_table)

    live = Live(render(), console=console, refresh_per_second=4, transient=True) if not args.quiet else None

    def on_update(state: RunProgress) -> None:
        progress_bar.update(task, total=state.jobs_total, completed=state.jobs_done)
        current = {(r["problem_id"], r["system"], r["budget"]): r for r in [*previous, *state.records]}
        summary = report.summarize(current.values(), names, budgets)
        done = state.units_done + state.skipped_units
        progress_bar.update(task, description=f"{done}/{state.units_total + state.skipped_units} units")
        line = report.running_line(summary)
        live_table[0] = Text(f"accuracy at {budgets[-1]} tokens so far: {line}" if line else "", style="cyan")
        live_table[1] = report.table(summary)
        if live is not None:
            live.update(render(), refresh=True)

    pool = ClientPool(args.url, args.api_key)
    body_options = {
        "seed": args.seed,
        "temperature": args.temperature,
        "sc_temperature": args.sc_temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "extra": args.job_options,
    }
    run = Run(
        problems,
        systems,
        budgets,
        scorer,
        out_dir,
        pool.run,
        canceller=pool.cancel,
        concurrency=args.concurrency,
        resume=args.resume,
        template=args.prompt_template,
        body_options=body_options,
        on_update=on_update,
    )
    started = time.time()
    t0 = time.monotonic()
    code = 0
    state: RunProgress | None = None
    try:
        if live is not None:
            live.start()
        state = run.execute()
    except KeyboardInterrupt:
        code = 130
    except FatalError as exc:
        code = 1
        err.print(Text(f"error: {exc}", style="bold red"))
    finally:
        if live is not None:
            live.stop()
        pool.close()
    wall = time.monotonic() - t0
    if code == 130:
        console.print(
            Text(
                f"interrupted: the jobs in flight were cancelled; --resume continues ({out_dir})",
                style="yellow",
            )
        )
    if code:
        return code
    assert state is not None
    records = [
        r for r in read_results(results_path).values() if r["problem_id"] in ids and r["system"] in names
    ]
    run_info = {
        "started": started,
        "wall_s": round(wall, 3),
        "jobs": state.jobs_done,
        "jobs_per_s": round(state.jobs_done / wall, 4) if wall > 0 else None,
        "completion_tokens": state.completion_tokens,
        "tokens_per_s": round(state.completion_tokens / wall, 2) if wall > 0 else None,
        "units": state.units_done,
        "units_resumed": state.skipped_units,
    }
    _report(out_dir, records, names, budgets, {"config": config, "run": run_info}, console, not args.no_plots)
    console.print(
        Text(
            f"{state.jobs_done} jobs in {wall:.1f} s ({state.jobs_done / max(wall, 1e-9):.3f} jobs/s, "
            f"{state.completion_tokens / max(wall, 1e-9):.1f} generated tokens/s)",
            style="dim",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
