"""Decode throughput of the Hogwild! engine, with N workers on one problem, against transformers ``generate``
on the same model, prompt and length, and against the engine running the same N sequences as N
independent one-worker jobs; at several prompt lengths.

What is measured (everything greedy; EOS is suppressed so every sequence writes exactly T tokens):

- ``generate``: ``hf_model.generate(ids, max_new_tokens=T, min_new_tokens=T, do_sample=False)`` on the
  one-worker job's exact prompt. A StoppingCriteria stamps the time after every new token; the first stamp
  comes after the prefill and the first token, so decode = last stamp - first stamp over T - 1 tokens and
  step latency = decode / (T - 1).
- ``hogwild N``: one combined-layout job of N workers, no finisher, no quick check.
- ``independent N``: N one-worker jobs of the same prompt in one engine (continuous batching).

For the engine rows (default scheduling: prompts are prefilled in chunks, so some sequences may start
decoding before others), ``eng.step()`` runs until every sequence decodes; then T steps are stamped and the
jobs are cancelled. The first of these steps writes the forced openers of the last job to start and samples
its first token, so, as for ``generate``, decode = last stamp - first stamp over T - 1 steps, tokens = tokens
generated in them, step latency = decode / (T - 1). The figure including the first step is in the JSON too.
Each job may write T plus a head start of tokens, so that none ends inside the window.

The weight-read floor is the time one step needs to read every weight once at the measured memory
bandwidth (a device-to-device copy): no decode step of a batch this small can be faster.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench import common, models
from engine import EngineOptions

# (decode seconds, decode tokens, decode steps, seconds and tokens including the first decode step)
Run = tuple[float, int, int, float | None, int | None]


@dataclass
class Figure:
    name: str
    kind: str  # generate | hogwild | independent
    context: int  # requested prompt length (tokens of text before instructions and chat template)
    prompt_tokens: int  # the actual prompt of each sequence
    sequences: int  # workers of the one job, or independent jobs
    tokens_per_s: float
    step_ms: float
    tokens: int  # generated tokens in the timed decode window (median run)
    steps: int
    seconds: float
    floor_ms: float  # weight-read floor of one step
    tokens_per_s_incl_first_step: float | None = None
    runs: list[float] | None = None  # tokens/s of every repeat
    speedup_vs_generate: float | None = None
    speedup_vs_1_worker: float | None = None
    tensor_parallel: int = 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    models.add_model_arguments(p)
    common.add_output_arguments(p)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument(
        "--contexts",
        type=int,
        nargs="+",
        default=None,
        help="prompt lengths in tokens of text (default: 256 2048 on the CPU, 256 2048 8192 on a GPU)",
    )
    p.add_argument("--tokens", type=int, default=32, help="generated tokens per sequence / worker")
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the median is reported")
    p.add_argument("--attention", default=EngineOptions.attention, help="the engine's attention backend")
    p.add_argument(
        "--cuda-graphs",
        choices=["true", "false"],
        default="true",
        help="replay decode steps from CUDA graphs (CUDA with triton attention)",
    )
    p.add_argument(
        "--fused-ops",
        choices=["true", "false"],
        default="true",
        help="norms, SiLU, RoPE and K/V writes fused (with the triton or cpu attention), or as torch ops",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="TOKENS",
        help="give every job a checkpoint every TOKENS tokens per worker (a greedy finisher branch beside "
        "the workers), to measure what the branches cost",
    )
    p.add_argument(
        "--tensor-parallel",
        type=int,
        nargs="+",
        default=[1],
        metavar="N",
        help="ranks to split the model over, one engine per value (e.g. 1 2: both in one run); with "
        "--threads each rank gets that many threads",
    )
    p.add_argument("--no-generate", action="store_true", help="skip transformers generate")
    p.add_argument("--no-independent", action="store_true", help="skip the independent-jobs rows")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile STEPS decode steps of a job with the most workers at the longest context",
    )


def bench_generate(hf_model: Any, ids: list[int], tokens: int) -> Run:
    """One greedy ``generate``: one step per token after the first."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = hf_model.device
    stamps: list[float] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            stamps.append(common.now(device))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    input_ids = torch.tensor([ids], device=device)
    eos = hf_model.generation_config.eos_token_id
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=eos if eos is not None else 0,
            stopping_criteria=StoppingCriteriaList([Clock()]),
        )
    assert out.shape[1] - input_ids.shape[1] == tokens == len(stamps)
    return stamps[-1] - stamps[0], tokens - 1, tokens - 1, None, None


def submit(
    eng: Any,
    prompt: str,
    workers: int,
    tokens: int,
    checkpoints: list[int] | None = None,
    instructions: str | None = None,
) -> Any:
    """By default the short instructions keep a context's length what it says (the full preset adds
    about 750 tokens of examples, the same for every context), and one worker gets none, as transformers'
    generate does; the format guards stay on."""
    bias = {t: -100.0 for t in eng.eos_ids}  # as min_new_tokens does for generate
    return eng.submit(
        prompt,
        workers=workers,
        layout="combined",
        max_tokens=tokens,
        finisher=False,
        quick_check_every=0,
        logit_bias=bias,
        instructions=instructions or ("short" if workers > 1 else "none"),
        checkpoints=checkpoints,
    )


def run_prefill(eng: Any, jobs: list[Any]) -> None:
    """Step until every job decodes; a job still queued after its first step means the pool is too small."""
    eng.step()
    if any(job.status == "queued" for job in jobs):
        raise RuntimeError("the KV pool cannot hold all sequences at once; raise kv_tokens")
    while any(job.status == "prefill" for job in jobs):
        eng.step()
    failed = [job for job in jobs if job.ended]
    if failed:
        raise RuntimeError(f"job ended during prefill: {failed[0].status} {failed[0].error}")


# Untimed decode steps before the window: the first steps at a new shape (or a longer context) capture a
# CUDA graph, which a window of a few dozen steps must not include.
WARM_STEPS = 3


def head_start(prompt_tokens: int, jobs: int, prefill_chunk: int) -> int:
    """Decode steps the first of ``jobs`` jobs may take while the others prefill: a prompt takes one step
    per chunk, plus one per static header block."""
    return jobs * (-(-prompt_tokens // prefill_chunk) + 8)


def bench_jobs(eng: Any, prompt: str, workers: int, jobs: int, tokens: int, every: int = 0) -> Run:
    """``jobs`` jobs of ``workers`` workers each: ``tokens`` steps once every sequence decodes, timed as
    (decode s, tokens, steps) after the first of them, then (s, tokens) including it; then cancelled.
    ``every``: a checkpoint every that many tokens per worker (branch tokens are not counted)."""
    extra = head_start(
        len(eng.prompt_ids(prompt, workers, "combined", "short")), jobs, eng.options.prefill_chunk
    )
    most = tokens + extra + WARM_STEPS
    checkpoints = list(range(every, most, every)) if every else None
    batch = [submit(eng, prompt, workers, most, checkpoints) for _ in range(jobs)]
    run_prefill(eng, batch)
    for _ in range(WARM_STEPS):
        eng.step()

    def generated() -> int:
        return sum(w.generated for job in batch for w in job.workers)

    start, before = common.now(eng.device), generated()
    stamps: list[float] = []
    counts: list[int] = []
    for _ in range(tokens):
        eng.step()
        stamps.append(common.now(eng.device))
        counts.append(generated())
    ended = [job for job in batch if job.ended]
    for job in batch:
        eng.cancel(job.id)
    if ended:  # fewer sequences for part of the window: the figure would not mean what it says
        raise RuntimeError(f"a job ended inside the timed window: {ended[0].finish_reason} {ended[0].error}")
    return stamps[-1] - stamps[0], counts[-1] - counts[0], tokens - 1, stamps[-1] - start, counts[-1] - before


def median_figure(runs: list[Run], floor_ms: float, **fields: Any) -> Figure:
    """Figure of the run with the median tokens/s (the lower middle one for an even count)."""
    rates = [tok / s for s, tok, *_ in runs]
    s, tok, steps, s_all, tok_all = sorted(runs, key=lambda r: r[1] / r[0])[(len(runs) - 1) // 2]
    incl = tok_all / s_all if s_all and tok_all else None
    return Figure(
        tokens_per_s=tok / s,
        step_ms=1000 * s / steps,
        tokens=tok,
        steps=steps,
        seconds=s,
        floor_ms=floor_ms,
        tokens_per_s_incl_first_step=incl,
        runs=rates,
        **fields,
    )


def profile(eng: Any, prompt: str, workers: int, steps: int) -> str:
    """Top 10 ops by self time (torch.profiler) and top 10 Python functions by self time (cProfile)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    report = []
    for tool in ("torch", "cprofile"):
        job = submit(eng, prompt, workers, steps + 8)
        run_prefill(eng, [job])
        eng.step()  # the openers' step
        if tool == "torch":
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if eng.device.type == "cuda" else [])
            with torch_profile(activities=acts) as prof:
                for _ in range(steps):
                    eng.step()
            key = "self_cuda_time_total" if eng.device.type == "cuda" else "self_cpu_time_total"
            report.append(prof.key_averages().table(sort_by=key, row_limit=10))
        else:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(steps):
                eng.step()
            pr.disable()
            buf = io.StringIO()
            pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(10)
            report.append(buf.getvalue())
        eng.cancel(job.id)
    return "\n".join(report)


def plot(figures: list[Figure], path: Any) -> None:
    """Tokens/s against workers (per context) and against context (per worker count); step ms vs floor."""
    contexts = sorted({f.context for f in figures})
    workers = sorted({f.sequences for f in figures if f.kind == "hogwild"})
    colors = {c: f"C{i}" for i, c in enumerate(contexts)}

    def series(kind: str, context: int) -> tuple[list[int], list[float], list[float]]:
        rows = sorted(
            (f for f in figures if f.kind == kind and f.context == context), key=lambda f: f.sequences
        )
        return [f.sequences for f in rows], [f.tokens_per_s for f in rows], [f.step_ms for f in rows]

    def draw(axes: Any) -> None:
        by_workers, by_context, steps = axes
        for c in contexts:
            n, rate, ms = series("hogwild", c)
            by_workers.plot(n, rate, "o-", color=colors[c], label=f"hogwild, {c} tok prompt")
            steps.plot(n, ms, "o-", color=colors[c], label=f"hogwild, {c} tok prompt")
            ni, rate_i, ms_i = series("independent", c)
            if ni:
                by_workers.plot(ni, rate_i, "s--", color=colors[c], label=f"independent jobs, {c}")
                steps.plot(ni, ms_i, "s--", color=colors[c], label=f"independent, {c}")
            _, gen, _ = series("generate", c)
            if gen:
                by_workers.axhline(gen[0], color=colors[c], ls=":", lw=1, label=f"generate, {c}")
        for i, w in enumerate(workers):
            rows = sorted(
                (f for f in figures if f.kind == "hogwild" and f.sequences == w), key=lambda f: f.context
            )
            by_context.plot(
                [f.context for f in rows],
                [f.tokens_per_s for f in rows],
                "o-",
                color=f"C{i}",
                label=f"hogwild {w} worker{'s' if w > 1 else ''}",
            )
        gen_rows = sorted((f for f in figures if f.kind == "generate"), key=lambda f: f.context)
        if gen_rows:
            by_context.plot(
                [f.context for f in gen_rows],
                [f.tokens_per_s for f in gen_rows],
                "k:x",
                label="transformers generate",
            )
        steps.axhline(figures[0].floor_ms, color="k", ls="--", lw=1, label="weight-read floor")
        for ax in (by_workers, steps):
            ax.set_xscale("log", base=2)
            ax.set_xticks(workers, [str(w) for w in workers])
            ax.set_xlabel("workers (or independent jobs)")
        by_workers.set_ylabel("generated tokens/s (all sequences)")
        by_context.set_xscale("log", base=2)
        by_context.set_xticks(contexts, [str(c) for c in contexts])
        by_context.set_xlabel("prompt tokens (text)")
        by_context.set_ylabel("generated tokens/s (all sequences)")
        steps.set_ylabel("decode step ms")
        by_workers.set_title("throughput vs workers")
        by_context.set_title("throughput vs context")
        steps.set_title("step latency")

    common.save_plot(draw, path, panels=3)


def bench_engine(
    eng: Any, loaded: Any, args: argparse.Namespace, prompts: dict[int, str], floor: Any, generate: bool
) -> list[Figure]:
    """Every row of the table for one engine (and ``generate`` beside the first)."""
    contexts, widest = list(prompts), max(args.workers)
    ranks = eng.options.tensor_parallel
    generate = generate and not args.no_generate
    common.log("warm-up ...")
    if generate:
        bench_generate(loaded.hf, eng.prompt_ids(prompts[contexts[0]], 1), 4)
    bench_jobs(eng, prompts[contexts[0]], widest, 1, 4)

    figures: list[Figure] = []
    for c in contexts:
        prompt = prompts[c]
        one = eng.prompt_ids(prompt, 1)  # the one-worker job's exact prompt (chat template included)
        row: dict[str, Any] = dict(context=c, floor_ms=floor.ms)
        if generate:
            runs = [bench_generate(loaded.hf, one, args.tokens) for _ in range(args.repeats)]
            figures.append(
                median_figure(
                    runs, name="generate", kind="generate", prompt_tokens=len(one), sequences=1, **row
                )
            )
        for n in args.workers:
            kinds = [("hogwild", n, 1)] + (
                [("independent", 1, n)] if n > 1 and not args.no_independent else []
            )
            for kind, workers, jobs in kinds:
                runs = [
                    bench_jobs(eng, prompt, workers, jobs, args.tokens, args.checkpoint_every)
                    for _ in range(args.repeats)
                ]
                ids = len(eng.prompt_ids(prompt, workers))
                name = f"{kind} {n}" + (f", tp {ranks}" if len(args.tensor_parallel) > 1 else "")
                figures.append(
                    median_figure(
                        runs,
                        name=name,
                        kind=kind,
                        prompt_tokens=ids,
                        sequences=n,
                        tensor_parallel=ranks,
                        **row,
                    )
                )
                common.log(f"{c} tokens, {name}: {figures[-1].tokens_per_s:.1f} tok/s")
    return figures


def main(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    if args.tokens < 2:
        raise SystemExit("--tokens must be >= 2 (the first token is not timed)")
    hf_logging.set_verbosity_error()
    device, dtype = models.device_and_dtype(args)
    contexts = args.contexts or ([256, 2048] if device.type == "cpu" else [256, 2048, 8192])
    loaded = models.load(args, materialize=not args.no_generate)
    tokenizer = loaded.tokenizer
    prompts = {c: common.make_prompt(c, tokenizer) for c in contexts}
    widest = max(args.workers)
    longest = max(len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts.values())
    # Room for the widest batch of jobs at the longest prompt (instructions and head start included).
    extra = head_start(longest + 1024, widest, EngineOptions.prefill_chunk)
    figures: list[Figure] = []
    for ranks in args.tensor_parallel:
        eng = loaded.engine(
            device,
            kv_tokens=widest * (longest + 1024 + 2 * (args.tokens + extra)),
            attention=args.attention,
            max_workers=max(widest, EngineOptions.max_workers),
            cuda_graphs=args.cuda_graphs == "true",
            fused_ops=args.fused_ops == "true",
            tensor_parallel=ranks,
        )
        floor = models.weight_floor(eng)  # rank 0's share: the ranks read theirs at the same time
        common.log(f"{loaded.label}, tensor parallel {ranks}: {floor.describe()}")
        figures += bench_engine(eng, loaded, args, prompts, floor, generate=ranks == args.tensor_parallel[0])
        if ranks != args.tensor_parallel[-1]:
            eng.close()
    for f in figures:
        gen = next((g for g in figures if g.kind == "generate" and g.context == f.context), None)
        one_worker = next(
            (
                g
                for g in figures
                if g.kind == "hogwild"
                and g.sequences == 1
                and g.context == f.context
                and g.tensor_parallel == f.tensor_parallel
            ),
            None,
        )
        f.speedup_vs_generate = f.tokens_per_s / gen.tokens_per_s if gen else None
        f.speedup_vs_1_worker = f.tokens_per_s / one_worker.tokens_per_s if one_worker else None

    graphs = eng.runner.graphs
    replayed = f", CUDA graphs ({graphs.captures} captures, {graphs.replays} replays)" if graphs else ""
    title = (
        f"{loaded.label}, {dtype}, {device}, {eng.options.attention} attention{replayed}: "
        f"{args.tokens} tokens/sequence; " + floor.describe()
    )
    columns = [
        "run",
        "context",
        "prompt tok",
        "tokens/s",
        "step ms",
        "step/floor",
        "vs generate",
        "vs 1 worker",
    ]
    common.print_table(
        title,
        columns,
        [
            [
                f.name,
                str(f.context),
                str(f.prompt_tokens),
                common.fmt(f.tokens_per_s),
                common.fmt(f.step_ms, 2),
                common.fmt(f.step_ms / f.floor_ms, 1, "x"),
                common.fmt(f.speedup_vs_generate, 2, "x"),
                common.fmt(f.speedup_vs_1_worker, 2, "x"),
            ]
            for f in figures
        ],
    )
    config = {
        "model": loaded.label,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": args.tokens,
        "contexts": contexts,
        "workers": args.workers,
        "tensor_parallel": args.tensor_parallel,
        "repeats": args.repeats,
        **floor.record(),
        "engine_options": asdict(eng.options),
        "graph_captures": graphs.captures if graphs else None,
        "graph_replays": graphs.replays if graphs else None,
    }
    if args.profile:
        config["profile"] = profile(eng, prompts[contexts[-1]], widest, args.profile)
        print(config["profile"])
    path = common.output_path(args, f"engine_{device.type}")
    common.write_result(path, device, config, __doc__ or "", [asdict(f) for f in figures])
    if args.plot:
        plot(figures, path)
    eng.close()
    return 0
