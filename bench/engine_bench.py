"""Decode throughput of the Hogwild! engine against transformers ``generate`` on the same model and prompt.

What is measured (both sides are greedy, EOS is suppressed so every sequence writes exactly T tokens):

- ``generate (1 seq)``: ``hf_model.generate(ids, max_new_tokens=T, min_new_tokens=T, do_sample=False)``.
  A StoppingCriteria stamps the time after every new token; the first stamp comes after the prefill and
  the first token, so decode = last stamp - first stamp over T - 1 tokens, step latency = decode / (T - 1).
- ``hogwild N workers``: one combined-layout job, greedy, ``max_tokens=T``, no finisher, no quick check.
  ``eng.step()`` runs until the job's prefill is done (status "running"); then every step is stamped. The
  first decode step writes the forced openers (a few tokens per worker) and samples each worker's first
  token, so, as for ``generate``, decode = last stamp - first stamp, tokens = generated tokens after the
  first step, step latency = decode / steps. The figure including the first decode step is in the JSON too.

Both use one transformers load (``Engine.from_hf``); torch's thread count is left at its default.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

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


@dataclass
class Figure:
    name: str
    tokens_per_s: float
    step_ms: float
    tokens: int  # generated tokens in the timed decode window (median run)
    steps: int
    seconds: float
    tokens_per_s_incl_first_step: float | None = None
    runs: list[float] | None = None  # tokens/s of every repeat
    speedup_vs_generate: float | None = None
    speedup_vs_1_worker: float | None = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per sequence / worker")
    p.add_argument("--prompt-tokens", type=int, default=256, help="tokens of real text in the user prompt")
    p.add_argument("--repeats", type=int, default=1, help="runs per row; the median is reported")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON output (default bench/results/engine_cpu.json)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="for both generate and the engine (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument("--model", default=None, help="hub id, folder or .gguf (default: the embedded model)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile STEPS decode steps of a job with the most workers",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests")


def make_prompt(tokenizer: Any, n_tokens: int) -> str:
    """Real text of about ``n_tokens`` tokens: passages cycled and cut to fit, then the question."""
    budget = max(n_tokens - len(tokenizer.encode(QUESTION, add_special_tokens=False)), 0)
    text, i = "", 0
    while len(tokenizer.encode(text, add_special_tokens=False)) < budget:
        text += PASSAGES[i % len(PASSAGES)] + "\n\n"
        i += 1
    context = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:budget]).strip()
    return f"{context}\n\n{QUESTION}" if context else QUESTION


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# (decode seconds, decode tokens, decode steps, seconds and tokens including the first decode step)
Run = tuple[float, int, int, float | None, int | None]


def bench_generate(hf_model: Any, ids: list[int], tokens: int) -> Run:
    """One greedy ``generate``: one step per token after the first."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    device = hf_model.device
    stamps: list[float] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            stamps.append(_now(device))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    input_ids = torch.tensor([ids], device=device)
    with torch.inference_mode():
        out = hf_model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=hf_model.generation_config.eos_token_id,
            stopping_criteria=StoppingCriteriaList([Clock()]),
        )
    assert out.shape[1] - input_ids.shape[1] == tokens == len(stamps)
    return stamps[-1] - stamps[0], tokens - 1, tokens - 1, None, None


def submit(eng: Any, prompt: str, workers: int, tokens: int) -> Any:
    bias = {t: -100.0 for t in eng.eos_ids}  # as min_new_tokens does for generate
    return eng.submit(
        prompt,
        workers=workers,
        layout="combined",
        max_tokens=tokens,
        finisher=False,
        quick_check_every=0,
        logit_bias=bias,
    )


def run_prefill(eng: Any, job: Any) -> None:
    while job.status != "running" and not job.ended:
        eng.step()


def bench_engine(eng: Any, prompt: str, workers: int, tokens: int) -> Run:
    """(decode s, tokens, steps) after the first decode step, then (s, tokens) including it."""
    job = submit(eng, prompt, workers, tokens)
    run_prefill(eng, job)
    if job.ended:
        raise RuntimeError(f"job ended during prefill: {job.status} {job.error}")
    start = _now(eng.device)
    stamps: list[float] = []
    counts: list[int] = []
    while not job.ended:
        eng.step()
        stamps.append(_now(eng.device))
        counts.append(sum(w.generated for w in job.workers))
    if job.status != "finished":
        raise RuntimeError(f"job {job.status}: {job.error}")
    return stamps[-1] - stamps[0], counts[-1] - counts[0], len(stamps) - 1, stamps[-1] - start, counts[-1]


def machine_info(device: torch.device) -> dict[str, Any]:
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
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _median_figure(name: str, runs: list[Run]) -> Figure:
    """Figure of the run with the median tokens/s (the lower middle one for an even count)."""
    rates = [tok / s for s, tok, *_ in runs]
    s, tok, steps, s_all, tok_all = sorted(runs, key=lambda r: r[1] / r[0])[(len(runs) - 1) // 2]
    incl = tok_all / s_all if s_all and tok_all else None
    return Figure(name, tok / s, 1000 * s / steps, tok, steps, s, incl, rates)


def profile(eng: Any, prompt: str, workers: int, steps: int) -> str:
    """Top 10 ops by self time (torch.profiler) and top 10 Python functions by self time (cProfile)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    report = []
    for tool in ("torch", "cprofile"):
        job = submit(eng, prompt, workers, steps + 8)
        run_prefill(eng, job)
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
        while not job.ended:
            eng.step()
    return "\n".join(report)


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from engine import Engine
    from engine.loader import load_hf

    if args.quick:
        args.tokens, args.prompt_tokens, args.repeats = min(args.tokens, 4), min(args.prompt_tokens, 32), 1
        args.workers = [w for w in args.workers if w <= 2] or [1]
    out: Path = args.out or Path("bench/results") / ("engine_quick.json" if args.quick else "engine_cpu.json")
    if args.tokens < 2:
        raise SystemExit("--tokens must be >= 2 (the first token is not timed)")
    hf_logging.set_verbosity_error()
    console = Console(width=max(Console().width, 110))
    device = torch.device(args.device)
    default = torch.float32 if device.type == "cpu" else torch.bfloat16
    dtype = getattr(torch, args.dtype) if args.dtype else default
    hf_model, tokenizer = load_hf(args.model, dtype)
    hf_model = hf_model.to(device).eval()
    eng = Engine.from_hf(hf_model, tokenizer, device=device)
    prompt = make_prompt(tokenizer, args.prompt_tokens)
    ids = eng.prompt_ids(prompt, 1)  # the 1-worker job's exact prompt (instructions + text, chat template)

    console.print(f"[dim]warm-up ({len(ids)} prompt tokens) ...[/dim]")
    bench_generate(hf_model, ids, 4)
    bench_engine(eng, prompt, max(args.workers), 4)

    runs = [bench_generate(hf_model, ids, args.tokens) for _ in range(args.repeats)]
    figures = [_median_figure("generate (1 seq)", runs)]
    for n in args.workers:
        runs = [bench_engine(eng, prompt, n, args.tokens) for _ in range(args.repeats)]
        figures.append(_median_figure(f"hogwild {n} worker{'s' if n > 1 else ''}", runs))
        console.print(f"[dim]{figures[-1].name}: {figures[-1].tokens_per_s:.1f} tok/s[/dim]")
    base = figures[0].tokens_per_s
    one = next((f.tokens_per_s for f in figures if f.name == "hogwild 1 worker"), None)
    for f in figures:
        f.speedup_vs_generate = f.tokens_per_s / base
        f.speedup_vs_1_worker = f.tokens_per_s / one if one else None

    lens = {n: len(eng.prompt_ids(prompt, n)) for n in args.workers}
    prompts = ", ".join(f"{n}w {k}" for n, k in lens.items())
    title = f"{device}: {args.tokens} tokens/seq; prompt tokens: generate {len(ids)}, {prompts}"
    table = Table(title=title)
    for col in ("", "tokens/s", "step latency ms", "speed-up vs generate", "speed-up vs 1 worker"):
        table.add_column(col, justify="left" if not col else "right")
    for f in figures:
        vs1 = f"{f.speedup_vs_1_worker:.2f}x" if f.speedup_vs_1_worker else "-"
        table.add_row(
            f.name, f"{f.tokens_per_s:.1f}", f"{f.step_ms:.1f}", f"{f.speedup_vs_generate:.2f}x", vs1
        )
    console.print(table)

    result = {
        "machine": machine_info(device),
        "config": {
            "model": args.model or "SmolLM2-135M-Instruct (embedded default)",
            "dtype": str(dtype).removeprefix("torch."),
            "tokens": args.tokens,
            "prompt_tokens_text": args.prompt_tokens,
            "prompt_tokens_by_workers": lens,
            "repeats": args.repeats,
            "workers": args.workers,
            "engine_options": asdict(eng.options),
        },
        "method": (__doc__ or "").strip(),
        "results": [asdict(f) for f in figures],
    }
    if args.profile:
        text = profile(eng, prompt, max(args.workers), args.profile)
        print(text)
        result["profile"] = text
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return 0
