"""Aggregate throughput and per-job latency of C concurrent Hogwild jobs in one engine.

For each concurrency C, C jobs of W workers (greedy, EOS suppressed so every worker writes exactly T tokens,
no finisher, no quick check) are submitted at once to one engine with its default scheduling (prefill
chunks of ``prefill_chunk`` tokens per step shared by all jobs, continuous batching of every worker of
every job). The clock is the engine's own: a job's ``created``, ``first_token_at`` and ``finished_at``.

- aggregate tokens/s: generated tokens of all jobs / (last finish - first submit)
- job latency: finish - submit; time to first token: first generated token - submit
- step ms: the same wall time / the number of engine steps it took (prefill steps included), beside the
  weight-read floor (every weight read once at the measured memory bandwidth)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench import common, models
from bench.engine_bench import submit
from engine import EngineOptions


@dataclass
class Figure:
    concurrency: int
    workers: int
    tokens_per_s: float
    step_ms: float
    steps: int
    seconds: float
    tokens: int
    latency_s: dict[str, float]  # mean, p50, p99
    ttft_s: dict[str, float]
    decode_tokens_per_s: float


def add_arguments(p: argparse.ArgumentParser) -> None:
    models.add_model_arguments(p)
    common.add_output_arguments(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--workers", type=int, default=2, help="workers per job")
    p.add_argument("--tokens", type=int, default=32, help="generated tokens per worker")
    p.add_argument("--prompt-tokens", type=int, default=256, help="tokens of text in each job's prompt")
    p.add_argument("--attention", default=EngineOptions.attention, help="the engine's attention backend")


def run(eng: Any, prompt: str, concurrency: int, workers: int, tokens: int) -> Figure:
    steps_before = eng.steps
    jobs = [submit(eng, prompt, workers, tokens) for _ in range(concurrency)]
    decode_tokens, decode_seconds = 0, 0.0
    while not all(job.ended for job in jobs):
        steady = all(job.status == "running" for job in jobs)
        before = sum(job.usage["completion_tokens"] for job in jobs)
        start = time.perf_counter()
        eng.step()
        if steady and all(job.status == "running" for job in jobs):
            decode_seconds += time.perf_counter() - start
            decode_tokens += sum(job.usage["completion_tokens"] for job in jobs) - before
    bad = [job for job in jobs if job.status != "finished"]
    if bad:
        raise RuntimeError(f"job {bad[0].status}: {bad[0].error}")
    start = min(job.created for job in jobs)
    seconds = max(job.finished_at for job in jobs) - start
    steps = eng.steps - steps_before
    generated = sum(job.usage["completion_tokens"] for job in jobs)
    return Figure(
        concurrency=concurrency,
        workers=workers,
        tokens_per_s=generated / seconds,
        step_ms=1000 * seconds / steps,
        steps=steps,
        seconds=seconds,
        tokens=generated,
        latency_s=common.summary([job.finished_at - job.created for job in jobs]),
        ttft_s=common.summary([job.first_token_at - job.created for job in jobs]),
        decode_tokens_per_s=decode_tokens / decode_seconds if decode_seconds else 0.0,
    )


def plot(figures: list[Figure], path: Any) -> None:
    def draw(axes: Any) -> None:
        rate, latency = axes
        c = [f.concurrency for f in figures]
        rate.plot(c, [f.tokens_per_s for f in figures], "o-")
        rate.set_ylabel("aggregate generated tokens/s")
        for key, style in (("p50", "o-"), ("p99", "s--")):
            latency.plot(c, [f.latency_s[key] for f in figures], style, label=f"job latency {key}")
            latency.plot(c, [f.ttft_s[key] for f in figures], style, label=f"time to first token {key}")
        latency.set_ylabel("seconds")
        for ax in axes:
            ax.set_xlabel(f"concurrent {figures[0].workers}-worker jobs")
            ax.set_xscale("log", base=2)
            ax.set_xticks(c, [str(x) for x in c])

    common.save_plot(draw, path, panels=2)


def main(args: argparse.Namespace) -> int:
    device, dtype = models.device_and_dtype(args)
    loaded = models.load(args, materialize=False)
    prompt = common.make_prompt(args.prompt_tokens, loaded.tokenizer)
    prompt_len = len(loaded.tokenizer.encode(prompt, add_special_tokens=False))
    widest = max(args.concurrency)
    # Room for every job at once, instructions and forced headers included (4096 covers the instructions
    # even in the byte tokenizer of random-weight shapes); a job left waiting would spoil the steady state.
    eng = loaded.engine(
        device,
        attention=args.attention,
        kv_tokens=widest * (prompt_len + 4096 + args.workers * 2 * args.tokens),
        max_running_jobs=max(widest, EngineOptions.max_running_jobs),
    )
    floor = models.weight_floor(eng)
    common.log("warm-up ...")
    run(eng, prompt, 1, args.workers, 4)
    figures = []
    for c in args.concurrency:
        figures.append(run(eng, prompt, c, args.workers, args.tokens))
        common.log(f"{c} jobs: {figures[-1].tokens_per_s:.1f} tok/s")
    common.print_table(
        f"{loaded.label}, {dtype}, {device}: {args.workers}-worker jobs, {args.tokens} tokens/worker, "
        f"{len(eng.prompt_ids(prompt, args.workers))} prompt tokens; {floor.describe()}",
        [
            "concurrent jobs",
            "tokens/s",
            "decode tokens/s",
            "step ms",
            "step/floor",
            "latency s mean/p50/p99",
            "TTFT s",
        ],
        [
            [
                str(f.concurrency),
                common.fmt(f.tokens_per_s),
                common.fmt(f.decode_tokens_per_s),
                common.fmt(f.step_ms, 2),
                common.fmt(f.step_ms / floor.ms, 1, "x"),
                common.fmt_summary(f.latency_s, 2),
                common.fmt_summary(f.ttft_s, 2),
            ]
            for f in figures
        ],
    )
    config = {
        "model": loaded.label,
        "dtype": str(dtype).removeprefix("torch."),
        "workers": args.workers,
        "tokens": args.tokens,
        "prompt_tokens": len(eng.prompt_ids(prompt, args.workers)),
        "concurrency": args.concurrency,
        **floor.record(),
        "engine_options": asdict(eng.options),
    }
    path = common.output_path(args, f"jobs_{device.type}")
    common.write_result(path, device, config, __doc__ or "", [asdict(f) for f in figures])
    if args.plot:
        plot(figures, path)
    return 0
