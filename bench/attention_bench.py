"""The Hogwild attention op alone, per implementation, against plain decode attention over as many keys.

For each worker count W (decode: one query token per worker) a pool holds ``common`` (C tokens), the two
header blocks of the combined layout (8 tokens each) and W step blocks of S tokens, scattered over pages
of 16 slots in random order as in the engine's pool. Worker i's view is
``[common, others_header, step[j] for j != i, own_header, step[i]]``: L = C + 16 + W*S keys.

Every implementation registered in ``ATTENTION_BACKENDS`` at run time is timed; one that cannot be built
or run here (triton on a CPU) is listed as skipped with the reason. The baselines, over the same L keys:

- ``sdpa 1 seq``: ``F.scaled_dot_product_attention`` of one query token over L contiguous keys (GQA)
- ``sdpa W seqs``: W independent sequences of L keys each (what W independent jobs of one prompt read)

``plan`` (once per step) and the call (once per layer) are each the median of the repeats; a step costs
plan + layers x call, against layers x the SDPA call; ``call x sdpa 1`` compares one layer's call alone
(the plan is host work, done once per step for all layers). The KV floor is the distinct K/V bytes a step
must read (every pool token once for Hogwild; W x L for independent sequences) at the measured bandwidth.
Each implementation's output is compared with the reference implementation's (max abs difference).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bench import common, models
from engine.layers.backends import ATTENTION_BACKENDS
from engine.layers.rotary import Rotary
from engine.layers.rows import RowSpec

HEADER_TOKENS = 8
PAGE_SIZE = 16


@dataclass
class Figure:
    op: str
    workers: int
    view_len: int
    plan_ms: float
    call_us: float
    step_ms: float  # plan + layers x call
    floor_ms: float  # layers x distinct KV bytes / bandwidth
    vs_sdpa_1: float | None = None  # step_ms / sdpa 1 seq's step_ms
    vs_sdpa_n: float | None = None
    call_vs_sdpa_1: float | None = None  # call_us / sdpa 1 seq's call_us: one layer, the plan left out
    max_abs_diff: float | None = None  # vs the reference implementation


@dataclass
class Case:
    """One step's attention inputs for W workers."""

    rows: list[RowSpec]
    q: torch.Tensor  # [W, heads, d]
    k_pool: torch.Tensor  # [slots, kv_heads, d]
    v_pool: torch.Tensor
    view_len: int
    pool_tokens: int


def add_arguments(p: argparse.ArgumentParser) -> None:
    models.add_model_arguments(p)
    common.add_output_arguments(p)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--common", type=int, default=None, help="tokens of common (default 2048 CPU, 16384 GPU)")
    p.add_argument("--step-tokens", type=int, default=None, help="tokens per step block (256 CPU, 1024 GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed samples per op; the median is reported")
    p.add_argument(
        "--variants",
        nargs="+",
        default=[],
        help="also time each backend with these settings, e.g. 'chunk=1024,items=none' (items of exactly "
        "1024 keys) or 'stages=5' (triton's software pipelining); a backend without a setting is skipped",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help=f"default: all registered ({', '.join(ATTENTION_BACKENDS)})",
    )


def build_case(
    config: Any, workers: int, common_len: int, step_len: int, dtype: torch.dtype, device: torch.device
) -> Case:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lengths = [common_len, HEADER_TOKENS, HEADER_TOKENS] + [step_len] * workers
    pages = [-(-n // PAGE_SIZE) for n in lengths]
    order = torch.randperm(sum(pages), generator=torch.Generator().manual_seed(0))
    slots, first = [], 0
    for n, count in zip(lengths, pages, strict=True):
        ids = order[first : first + count]
        slots.append((ids[:, None] * PAGE_SIZE + torch.arange(PAGE_SIZE)).flatten()[:n])  # on the host
        first += count
    common_slots, others_header, own_header, steps = slots[0], slots[1], slots[2], slots[3:]
    rows = []
    for i in range(workers):
        view = [common_slots, others_header] + [s for j, s in enumerate(steps) if j != i]
        view += [own_header, steps[i]]
        offsets = [0]
        for s in view[:-1]:
            offsets.append(offsets[-1] + len(s))
        rows.append(RowSpec(i, 1, list(zip(view, offsets, strict=True))))
    size = (sum(pages) * PAGE_SIZE, kv_heads, dim)
    return Case(
        rows=rows,
        q=torch.randn(workers, heads, dim, dtype=dtype, device=device),
        k_pool=torch.randn(size, dtype=dtype, device=device),
        v_pool=torch.randn(size, dtype=dtype, device=device),
        view_len=rows[0].view_len,
        pool_tokens=sum(lengths),
    )


def sdpa_seconds(case: Case, sequences: int, repeats: int) -> float:
    """One decode query per sequence over ``view_len`` contiguous keys of its own."""
    heads, dim = case.q.shape[1:]
    kv_heads = case.k_pool.shape[1]
    q = case.q.new_empty(sequences, heads, 1, dim).normal_()
    k = case.q.new_empty(sequences, kv_heads, case.view_len, dim).normal_()
    v = torch.randn_like(k)
    return common.time_call(
        lambda: F.scaled_dot_product_attention(q, k, v, scale=dim**-0.5, enable_gqa=True),
        case.q.device,
        repeats,
    )


def backends(names: list[str], variants: list[str]) -> list[tuple[str, Callable[[], Any]]]:
    """(name, factory) of each backend, then of each with each variant's ``attribute=value`` settings."""
    out: list[tuple[str, Callable[[], Any]]] = [(name, ATTENTION_BACKENDS[name]) for name in names]
    for variant in variants:
        settings = {
            key: None if value == "none" else int(value)
            for key, value in (item.split("=", 1) for item in variant.split(","))
        }
        for name in names:

            def make(name: str = name, settings: dict[str, int | None] = settings) -> Any:
                backend = ATTENTION_BACKENDS[name]()
                for key, value in settings.items():
                    if not hasattr(backend, key):
                        raise TypeError(f"{name} has no setting {key}")
                    setattr(backend, key, value)
                return backend

            out.append((f"{name} {variant}", make))
    return out


def time_backend(
    backend: Any, case: Case, rotary: Rotary, scale: float, repeats: int
) -> tuple[float, float, torch.Tensor]:
    """(plan seconds, call seconds, output); raises whatever the backend raises on this device."""
    dtype, device = case.q.dtype, case.q.device
    plan = backend.plan(case.rows, rotary, dtype)
    out = backend(case.q, case.k_pool, case.v_pool, plan, scale)
    plan_s = common.time_call(lambda: backend.plan(case.rows, rotary, dtype), device, repeats)
    call_s = common.time_call(lambda: backend(case.q, case.k_pool, case.v_pool, plan, scale), device, repeats)
    return plan_s, call_s, out


def main(args: argparse.Namespace) -> int:
    device, dtype = models.device_and_dtype(args)
    config = models.model_config(args)
    gpu = device.type == "cuda"
    common_len = args.common or (16384 if gpu else 2048)
    step_len = args.step_tokens or (1024 if gpu else 256)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary = Rotary(config, dim, device)
    bandwidth = common.measure_bandwidth(device)
    label = f"{args.shape} shape" if args.shape else (args.model or "default model")
    token_bytes = 2 * (getattr(config, "num_key_value_heads", None) or heads) * dim * dtype.itemsize

    def floor_ms(tokens: int) -> float:
        return 1000 * layers * tokens * token_bytes / bandwidth

    figures: list[Figure] = []
    skipped: dict[str, str] = {}
    with torch.inference_mode():
        for w in args.workers:
            case = build_case(config, w, common_len, step_len, dtype, device)
            base = []
            for op, n in [("sdpa 1 seq", 1)] + ([(f"sdpa {w} seqs", w)] if w > 1 else []):
                s = sdpa_seconds(case, n, args.repeats)
                base.append(
                    Figure(op, w, case.view_len, 0.0, 1e6 * s, 1000 * layers * s, floor_ms(n * case.view_len))
                )
            reference: torch.Tensor | None = None
            rows = []
            for name, backend in backends(args.backends or list(ATTENTION_BACKENDS), args.variants):
                if name in skipped:
                    continue
                try:
                    plan_s, call_s, out = time_backend(backend(), case, rotary, dim**-0.5, args.repeats)
                except Exception as exc:  # an optional backend that does not run here is reported, not fatal
                    skipped[name] = f"{type(exc).__name__}: {exc}"
                    common.log(f"{name}: skipped ({skipped[name]})")
                    continue
                reference = out if reference is None else reference
                step_ms = 1000 * (plan_s + layers * call_s)
                diff = (out.float() - reference.float()).abs().max().item()
                rows.append(
                    Figure(
                        name,
                        w,
                        case.view_len,
                        1000 * plan_s,
                        1e6 * call_s,
                        step_ms,
                        floor_ms(case.pool_tokens),
                        max_abs_diff=diff,
                    )
                )
                common.log(f"{w} workers, {name}: {step_ms:.2f} ms/step")
            for f in base + rows:
                f.vs_sdpa_1 = f.step_ms / base[0].step_ms
                f.vs_sdpa_n = f.step_ms / base[-1].step_ms
                f.call_vs_sdpa_1 = f.call_us / base[0].call_us
            figures += base + rows

    common.print_table(
        f"{label}, {dtype}, {device}: attention of one decode step, {layers} layers; common {common_len} "
        f"tokens + {step_len} per worker; bandwidth {bandwidth / 1e9:.0f} GB/s",
        [
            "op",
            "workers",
            "keys/view",
            "plan ms",
            "call us",
            "step ms",
            "KV floor ms",
            "x sdpa 1",
            "x sdpa W",
            "call x sdpa 1",
            "max diff",
        ],
        [
            [
                f.op,
                str(f.workers),
                str(f.view_len),
                common.fmt(f.plan_ms, 2),
                common.fmt(f.call_us),
                common.fmt(f.step_ms, 2),
                common.fmt(f.floor_ms, 2),
                common.fmt(f.vs_sdpa_1, 2, "x"),
                common.fmt(f.vs_sdpa_n, 2, "x"),
                common.fmt(f.call_vs_sdpa_1, 2, "x"),
                "-" if f.max_abs_diff is None else f"{f.max_abs_diff:.1e}",
            ]
            for f in figures
        ],
    )
    run_config = {
        "model": label,
        "dtype": str(dtype).removeprefix("torch."),
        "layers": layers,
        "heads": heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": dim,
        "common_tokens": common_len,
        "step_tokens": step_len,
        "header_tokens": HEADER_TOKENS,
        "workers": args.workers,
        "bandwidth_bytes_per_s": bandwidth,
        "backends": sorted({f.op for f in figures if not f.op.startswith("sdpa")}),
        "skipped": skipped,
    }
    path = common.output_path(args, f"attention_{device.type}")
    common.write_result(path, device, run_config, __doc__ or "", [asdict(f) for f in figures])
    if args.plot:
        plot(figures, path)
    return 0


def plot(figures: list[Figure], path: Any) -> None:
    def draw(axes: Any) -> None:
        (ax,) = axes
        ops: dict[str, list[Figure]] = {}
        for f in figures:
            independent = f.op.startswith("sdpa") and f.op != "sdpa 1 seq"
            ops.setdefault("sdpa W seqs" if independent else f.op, []).append(f)
        for op, rows in ops.items():
            ax.plot([f.workers for f in rows], [f.step_ms for f in rows], "o-", label=op)
        workers = sorted({f.workers for f in figures})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(workers, [str(w) for w in workers])
        ax.set_xlabel("workers")
        ax.set_ylabel("attention ms per decode step (all layers)")

    common.save_plot(draw, path)
