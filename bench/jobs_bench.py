"""Aggregate throughput and per-job latency of C concurrent Hogwild jobs in one engine, with the prefix
cache on and off.

For each ``--prefix-cache`` setting a fresh engine is built and warmed up on a job without instructions
(the kernels are ready, the instructions are not cached). Then:

- cold and cached time to first token: one job alone with the instructions preset and a question, then
  one with the same preset and another question; with the cache on the second reads the preset's pages
  (every job's chat template, instructions and worked examples) from the cache. For the cache off both
  are cold.
- for each concurrency C, C jobs of W workers (greedy, EOS suppressed so every worker writes exactly T
  tokens, no finisher, no quick check), each with its own problem text after the shared preset, are
  submitted at once with the engine's default scheduling (prefill chunks of ``prefill_chunk`` tokens per
  step shared by all jobs, continuous batching of every worker of every job). The clock is the engine's
  own: a job's ``created``, ``first_token_at`` and ``finished_at``.

- aggregate tokens/s: generated tokens of all jobs / (last finish - first submit); ``x 1 job``: over the
  1-job figure of the same setting
- job latency: finish - submit; time to first token: first generated token - submit
- step ms: the same wall time / the number of engine steps it took (prefill steps included), beside the
  weight-read floor (every weight read once at the measured memory bandwidth)
- pages per job: the most KV pages held at once while all C jobs decode (a shared cached page counts
  once), over C; cached tokens: prompt tokens the jobs read from the cache
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
    prefix_cache: bool
    concurrency: int
    workers: int
    tokens_per_s: float
    vs_one_job: float
    step_ms: float
    steps: int
    seconds: float
    tokens: int
    latency_s: dict[str, float]  # mean, p50, p99
    ttft_s: dict[str, float]
    decode_tokens_per_s: float
    pages_per_job: float
    cached_tokens: int
    prompt_tokens: int


@dataclass
class FirstToken:
    prefix_cache: bool
    cold_ttft_s: float
    cached_ttft_s: float
    cached_tokens: int  # of the second job's prompt
    prompt_tokens: int


def add_arguments(p: argparse.ArgumentParser) -> None:
    models.add_model_arguments(p)
    common.add_output_arguments(p)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--workers", type=int, default=2, help="workers per job")
    p.add_argument("--tokens", type=int, default=32, help="generated tokens per worker")
    p.add_argument("--prompt-tokens", type=int, default=256, help="tokens of text in each job's prompt")
    p.add_argument("--instructions", default="short", help="the instructions preset of every job")
    p.add_argument(
        "--prefix-cache",
        nargs="+",
        choices=["true", "false"],
        default=["true", "false"],
        help="the settings to measure, each on a fresh engine",
    )
    p.add_argument("--attention", default=EngineOptions.attention, help="the engine's attention backend")


def held_pages(eng: Any) -> int:
    pool = eng.pool
    return int(pool.num_pages - pool.free_list_len - pool.evictable)


def run(eng: Any, prompts: list[str], workers: int, tokens: int, instructions: str) -> dict[str, Any]:
    """Submit one job per prompt at once and step until all have ended; what the figures are made of."""
    steps_before = eng.steps
    jobs = [submit(eng, p, workers, tokens, instructions=instructions) for p in prompts]
    decode_tokens, decode_seconds, peak = 0, 0.0, 0.0
    while not all(job.ended for job in jobs):
        steady = all(job.status == "running" for job in jobs)
        before = sum(job.usage["completion_tokens"] for job in jobs)
        start = time.perf_counter()
        eng.step()
        if all(job.status == "running" for job in jobs):
            peak = max(peak, held_pages(eng) / len(jobs))
        if steady and all(job.status == "running" for job in jobs):
            decode_seconds += time.perf_counter() - start
            decode_tokens += sum(job.usage["completion_tokens"] for job in jobs) - before
    bad = [job for job in jobs if job.status != "finished"]
    if bad:
        raise RuntimeError(f"job {bad[0].status}: {bad[0].error}")
    start = min(job.created for job in jobs)
    seconds = max(job.finished_at for job in jobs) - start
    return {
        "jobs": jobs,
        "seconds": seconds,
        "steps": eng.steps - steps_before,
        "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else 0.0,
        "pages_per_job": peak,
    }


def problems(prompt: str, count: int, first: int = 0) -> list[str]:
    """Prompts that differ from their first words on: only the preset before them is shared."""
    return [f"Problem {first + k}. {prompt}" for k in range(count)]


def figure(
    cache: bool, concurrency: int, workers: int, done: dict[str, Any], one_job: float | None
) -> Figure:
    jobs, seconds = done["jobs"], done["seconds"]
    generated = sum(job.usage["completion_tokens"] for job in jobs)
    rate = generated / seconds
    return Figure(
        prefix_cache=cache,
        concurrency=concurrency,
        workers=workers,
        tokens_per_s=rate,
        vs_one_job=rate / (one_job or rate),
        step_ms=1000 * seconds / done["steps"],
        steps=done["steps"],
        seconds=seconds,
        tokens=generated,
        latency_s=common.summary([job.finished_at - job.created for job in jobs]),
        ttft_s=common.summary([job.first_token_at - job.created for job in jobs]),
        decode_tokens_per_s=done["decode_tokens_per_s"],
        pages_per_job=done["pages_per_job"],
        cached_tokens=sum(job.cached_tokens for job in jobs),
        prompt_tokens=sum(len(job.prompt_ids) for job in jobs),
    )


def plot(figures: list[Figure], path: Any) -> None:
    def draw(axes: Any) -> None:
        rate, latency = axes
        for cache in sorted({f.prefix_cache for f in figures}, reverse=True):
            mine = [f for f in figures if f.prefix_cache == cache]
            c = [f.concurrency for f in mine]
            label = "prefix cache on" if cache else "prefix cache off"
            rate.plot(c, [f.tokens_per_s for f in mine], "o-", label=label)
            latency.plot(c, [f.ttft_s["p50"] for f in mine], "o-", label=f"TTFT p50, {label}")
            latency.plot(c, [f.latency_s["p50"] for f in mine], "s--", label=f"job latency p50, {label}")
        rate.set_ylabel("aggregate generated tokens/s")
        latency.set_ylabel("seconds")
        for ax in axes:
            ax.set_xlabel(f"concurrent {figures[0].workers}-worker jobs")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({f.concurrency for f in figures}))
            ax.set_xticklabels([str(x) for x in sorted({f.concurrency for f in figures})])

    common.save_plot(draw, path, panels=2)


def main(args: argparse.Namespace) -> int:
    device, dtype = models.device_and_dtype(args)
    loaded = models.load(args, materialize=False)
    prompt = common.make_prompt(args.prompt_tokens, loaded.tokenizer)
    prompt_len = len(loaded.tokenizer.encode(prompt, add_special_tokens=False))
    widest = max(args.concurrency)
    figures: list[Figure] = []
    first_tokens: list[FirstToken] = []
    for setting in args.prefix_cache:
        cache = setting == "true"
        # Room for every job at once, instructions and forced headers included (4096 covers the
        # instructions even in the byte tokenizer of random-weight shapes); a job left waiting would spoil
        # the steady state.
        eng = loaded.engine(
            device,
            attention=args.attention,
            kv_tokens=widest * (prompt_len + 4096 + args.workers * 2 * args.tokens),
            max_running_jobs=max(widest, EngineOptions.max_running_jobs),
            prefix_cache=cache,
        )
        floor = models.weight_floor(eng)
        common.log(f"prefix cache {setting}: warm-up ...")
        run(eng, problems(prompt, 1, -1), args.workers, 4, "none")
        cold, cached = (
            run(eng, [p], args.workers, 1, args.instructions)["jobs"][0] for p in problems(prompt, 2, 1000)
        )
        first_tokens.append(
            FirstToken(
                cache,
                cold.first_token_at - cold.created,
                cached.first_token_at - cached.created,
                cached.cached_tokens,
                len(cached.prompt_ids),
            )
        )
        one_job, numbered = None, 0
        for c in args.concurrency:
            # New problem numbers for every run: no job finds its own text cached from an earlier run.
            done = run(eng, problems(prompt, c, numbered), args.workers, args.tokens, args.instructions)
            numbered += c
            figures.append(figure(cache, c, args.workers, done, one_job if c != 1 else None))
            one_job = figures[-1].tokens_per_s if c == 1 else one_job
            common.log(f"{c} jobs: {figures[-1].tokens_per_s:.1f} tok/s")
    common.print_table(
        f"{loaded.label}, {dtype}, {device}: time to first token of one job alone, "
        f"{args.instructions} instructions",
        ["prefix cache", "cold TTFT s", "cached TTFT s", "cached / cold", "cached tokens"],
        [
            [
                "on" if t.prefix_cache else "off",
                common.fmt(t.cold_ttft_s, 3),
                common.fmt(t.cached_ttft_s, 3),
                common.fmt(t.cached_ttft_s / t.cold_ttft_s, 2),
                f"{t.cached_tokens} of {t.prompt_tokens}",
            ]
            for t in first_tokens
        ],
    )
    common.print_table(
        f"{loaded.label}, {dtype}, {device}: {args.workers}-worker jobs, {args.tokens} tokens/worker, "
        f"{args.instructions} instructions, {prompt_len} tokens of problem text; {floor.describe()}",
        [
            "prefix cache",
            "concurrent jobs",
            "tokens/s",
            "x 1 job",
            "step ms",
            "step/floor",
            "latency s p50",
            "TTFT s p50/p99",
            "pages/job",
            "cached tokens",
        ],
        [
            [
                "on" if f.prefix_cache else "off",
                str(f.concurrency),
                common.fmt(f.tokens_per_s),
                common.fmt(f.vs_one_job, 2, "x"),
                common.fmt(f.step_ms, 2),
                common.fmt(f.step_ms / floor.ms, 1, "x"),
                common.fmt(f.latency_s["p50"], 2),
                f"{common.fmt(f.ttft_s['p50'], 2)}/{common.fmt(f.ttft_s['p99'], 2)}",
                common.fmt(f.pages_per_job),
                f"{f.cached_tokens}/{f.prompt_tokens}",
            ]
            for f in figures
        ],
    )
    config = {
        "model": loaded.label,
        "dtype": str(dtype).removeprefix("torch."),
        "workers": args.workers,
        "tokens": args.tokens,
        "instructions": args.instructions,
        "problem_tokens": prompt_len,
        "concurrency": args.concurrency,
        "prefix_cache": args.prefix_cache,
        **floor.record(),
        "engine_options": asdict(eng.options),
    }
    path = common.output_path(args, f"jobs_{device.type}")
    results = {"first_token": [asdict(t) for t in first_tokens], "jobs": [asdict(f) for f in figures]}
    common.write_result(path, device, config, __doc__ or "", results)
    if args.plot:
        plot(figures, path)
    return 0
