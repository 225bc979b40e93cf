"""Inter-token latency of running jobs while a long prompt is admitted, with and without chunked prefill.

R running 2-worker jobs decode (greedy, EOS suppressed, no finisher); after a warm-up the benchmark submits
one job with a long prompt and keeps stepping until that job's workers have written their first tokens.
Each engine step gives every running worker one token, so a step's wall time is the inter-token latency
the running jobs see. ``prefill_chunk`` bounds the prompt tokens prefilled per step; a chunk at least as
long as the prompt means no chunking (the whole prompt in one step).

- ITL before: step times while only the running jobs decode
- ITL during: step times from the long job's submission until its first generated token
- TTFT of the long job: its submission to its first generated token
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench import common, models
from bench.engine_bench import submit

RUNNING_TOKENS = 512  # outlives warm-up plus the admission of any prompt the pool holds


@dataclass
class Figure:
    prefill_chunk: int
    itl_before_ms: dict[str, float]
    itl_during_ms: dict[str, float]
    admission_steps: int
    long_ttft_s: float


def add_arguments(p: argparse.ArgumentParser) -> None:
    models.add_model_arguments(p)
    common.add_output_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=2000, help="the admitted job's prompt")
    p.add_argument("--running", type=int, default=2, help="2-worker jobs already decoding")
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 0], help="0: no chunking")
    p.add_argument("--warmup-steps", type=int, default=8)


def measure(
    eng: Any, long_prompt: str, running: int, warmup: int
) -> tuple[list[float], list[float], int, float]:
    short = common.make_prompt(64, eng.tokenizer)
    jobs = [submit(eng, short, 2, RUNNING_TOKENS) for _ in range(running)]
    while any(job.status != "running" for job in jobs):
        eng.step()
    before = []
    for _ in range(warmup):
        start = time.perf_counter()
        eng.step()
        before.append(time.perf_counter() - start)
    long_job = submit(eng, long_prompt, 2, 4)
    during = []
    while long_job.first_token_at is None:
        start = time.perf_counter()
        eng.step()
        during.append(time.perf_counter() - start)
    ttft = long_job.first_token_at - long_job.created
    for job in [*jobs, long_job]:
        eng.cancel(job.id)
    return before, during, len(during), ttft


def plot(figures: list[Figure], path: Any) -> None:
    def draw(axes: Any) -> None:
        (ax,) = axes
        labels = [str(f.prefill_chunk or "none") for f in figures]
        x = range(len(figures))
        ax.bar([i - 0.2 for i in x], [f.itl_before_ms["p50"] for f in figures], 0.2, label="before, p50")
        ax.bar(list(x), [f.itl_during_ms["p50"] for f in figures], 0.2, label="during admission, p50")
        ax.bar([i + 0.2 for i in x], [f.itl_during_ms["p99"] for f in figures], 0.2, label="during, p99")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("prefill chunk (tokens per step)")
        ax.set_ylabel("inter-token latency of running jobs, ms")
        ax.set_yscale("log")

    common.save_plot(draw, path)


def main(args: argparse.Namespace) -> int:
    device, dtype = models.device_and_dtype(args)
    loaded = models.load(args, materialize=False)
    long_prompt = common.make_prompt(args.prompt_tokens, loaded.tokenizer)
    figures = []
    for chunk in args.chunks:
        size = chunk or 4 * args.prompt_tokens
        eng = loaded.engine(device, prefill_chunk=size)
        common.log(f"prefill_chunk={chunk or 'none'}")
        before, during, steps, ttft = measure(eng, long_prompt, args.running, args.warmup_steps)
        figures.append(
            Figure(
                prefill_chunk=chunk,
                itl_before_ms=common.summary([1000 * s for s in before]),
                itl_during_ms=common.summary([1000 * s for s in during]),
                admission_steps=steps,
                long_ttft_s=ttft,
            )
        )
    rows = [
        [
            str(f.prefill_chunk or "none"),
            common.fmt(f.itl_before_ms["p50"]),
            common.fmt(f.itl_during_ms["p50"]),
            common.fmt(f.itl_during_ms["p99"]),
            str(f.admission_steps),
            common.fmt(f.long_ttft_s, 2),
        ]
        for f in figures
    ]
    title = (
        f"{args.running} running 2-worker jobs while a {args.prompt_tokens}-token prompt is admitted "
        f"({loaded.label})"
    )
    columns = [
        "prefill chunk",
        "ITL before p50 ms",
        "ITL during p50 ms",
        "ITL during p99 ms",
        "steps",
        "long TTFT s",
    ]
    common.print_table(title, columns, rows)
    config = {
        "model": loaded.label,
        "dtype": str(dtype),
        "prompt_tokens": args.prompt_tokens,
        "running": args.running,
    }
    path = common.output_path(args, f"prefill_{device.type}")
    if args.plot:
        plot(figures, path)
    common.write_result(
        path,
        device,
        config,
        __doc__ or "",
        [asdict(f) for f in figures],
    )
    return 0
