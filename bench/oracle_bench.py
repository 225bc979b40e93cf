"""The engine against the float64 oracle (tests/reference_hogwild.py), per model family, layout, worker
count, dtype and attention backend; and deliberately wrong references, with how far above the tolerance
each lands.

Each case is one greedy, traced job on a wired tiny model of the family (tests/models.py): the prompt
"Add 2 and 3." with the short instructions, ``--tokens`` tokens per worker, a quick check every 6 tokens,
the finisher. Its trace is replayed through transformers' own forward in float64 and compared as
tests/oracle_cases.py says:

- error: max over the compared rows of max |engine - oracle| / (max - min of the oracle's logits)
- tolerance: 1e-5 for float32; for bfloat16 3x transformers' own bfloat16 error on the same trace (the bf16
  model replayed through the same reference cache, same measure), which the table shows as "hf bf16"
- argmax: the share of greedy rows whose token is the oracle's argmax (the others are near ties)

Wrong variants (``WRONG_VARIANTS``): no same-step visibility, keys left at their block-local positions,
YaRN's attention factor applied twice. Each is replayed on the traces of the first backend's combined-layout
cases with several workers (yarn only on a YaRN model) and its error is divided by that case's tolerance:
the margin; above 1 means detected. The exit status is 1 if a case fails or a float32 margin is not above
1 (the bfloat16 margins are for information: see tests/oracle_cases.py).

Nothing is timed. ``triton`` runs in Triton's interpreter on a CPU (``TRITON_INTERPRET=1``, set here when
triton is not imported yet): minutes per case, so it is not in the default backends on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

from bench import common

DTYPES = ("float32", "bfloat16")
LAYOUTS = ("combined", "interleaved", "contiguous", "plain")


@dataclass
class Case:
    family: str
    layout: str
    workers: int
    dtype: str
    backend: str
    rows: int
    max_error: float
    tolerance: float
    hf_error: float | None  # transformers' own error in the dtype (bfloat16)
    argmax_agree: float
    greedy: int
    rollovers: int
    passed: bool


@dataclass
class Detection:
    variant: str
    family: str
    layout: str
    workers: int
    dtype: str
    max_error: float
    tolerance: float
    margin: float


def default_backends() -> list[str]:
    import torch

    from engine.layers.cpu_kernels import load_cpu_kernels

    backends = ["vectorized", "reference"]
    if load_cpu_kernels():
        backends.append("cpu")
    if torch.cuda.is_available():
        backends.append("triton")
    return backends


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_output_arguments(p)
    p.add_argument("--families", nargs="+", default=None, help="default: every family of tests/models.py")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS[:3]), choices=LAYOUTS)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="default: vectorized reference, cpu and triton if they run",
    )
    p.add_argument("--tokens", type=int, default=40, help="max_tokens per worker")
    p.add_argument("--device", default="cpu")


def _triton_ready(backends: list[str], device: str) -> str | None:
    """An error message if the Triton backend cannot run here as asked."""
    if "triton" not in backends or device != "cpu":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if "triton" in sys.modules:
        return "triton on a CPU needs TRITON_INTERPRET=1 before triton is imported: set it in the environment"
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def main(args: argparse.Namespace) -> int:
    backends = args.backends or default_backends()
    problem = _triton_ready(backends, args.device)
    if problem:
        common.log(problem)
        return 2

    import torch

    from engine import Engine
    from tests.models import ALL_FAMILIES, tiny_model, tokenizer
    from tests.oracle_cases import BF16_MULTIPLE, TOL_FLOAT32, Oracle, compare
    from tests.reference_hogwild import WRONG_VARIANTS

    device = torch.device(args.device)
    families = args.families or list(ALL_FAMILIES)
    tok = tokenizer()
    cases: list[Case] = []
    detections: list[Detection] = []
    variant_layout = "combined" if "combined" in args.layouts else args.layouts[0]
    for family in families:
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for layout in args.layouts:
                for workers in args.workers if layout != "plain" else [1]:
                    model = tiny_model(family, tok).to(dtype)
                    torch.nn.Module.to(model, device)
                    oracle = Oracle(model)
                    for b, backend in enumerate(backends):
                        eng = Engine.from_hf(
                            model, tok, page_size=4, num_pages=4096, attention=backend, prefill_chunk=96
                        )
                        job = eng.generate(
                            "Add 2 and 3.",
                            workers=workers,
                            layout=layout,
                            max_tokens=args.tokens,
                            quick_check_every=6,
                            finisher=True,
                            instructions="short",
                            trace=True,
                        )
                        result = compare(model, job, oracle)
                        cases.append(
                            Case(
                                family,
                                layout,
                                workers,
                                dtype_name,
                                backend,
                                result.rows,
                                result.max_error,
                                result.tolerance,
                                result.baseline,
                                result.argmax_agree / max(result.greedy, 1),
                                result.greedy,
                                sum(len(s.rollovers) for s in job.trace),
                                not result.failures(),
                            )
                        )
                        common.log(
                            f"{family} {layout} {workers} {dtype_name} {backend}: "
                            f"error {result.max_error:.2e} (tolerance {result.tolerance:.2e})"
                        )
                        if b or layout != variant_layout or workers < 2:
                            continue
                        for name, variant in WRONG_VARIANTS.items():
                            if variant.yarn_twice and "yarn" not in family:
                                continue
                            wrong = compare(model, job, oracle, variant)
                            detections.append(
                                Detection(
                                    name,
                                    family,
                                    layout,
                                    workers,
                                    dtype_name,
                                    wrong.max_error,
                                    wrong.tolerance,
                                    wrong.margin,
                                )
                            )
    print_tables(cases, detections, backends)
    config = {
        "families": families,
        "layouts": args.layouts,
        "workers": args.workers,
        "dtypes": args.dtypes,
        "backends": backends,
        "tokens": args.tokens,
        "tol_float32": TOL_FLOAT32,
        "bf16_multiple": BF16_MULTIPLE,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    results = {"cases": [asdict(c) for c in cases], "variants": [asdict(d) for d in detections]}
    path = common.output_path(args, "oracle_cpu" if device.type == "cpu" else "oracle_gpu")
    common.write_result(path, device, config, __doc__ or "", results)
    path.with_suffix(".md").write_text(markdown(cases, detections, backends))
    common.log(f"wrote {path.with_suffix('.md')}")
    if args.plot:
        common.save_plot(lambda axes: plot(axes, cases), path)
    # The float32 tolerance must catch every wrong variant; the bfloat16 margins are for information.
    caught = all(d.margin > 1 for d in detections if d.dtype == "float32")
    return 0 if all(c.passed for c in cases) and caught else 1


def _key(c: Case) -> tuple[str, str, int, str]:
    return (c.family, c.layout, c.workers, c.dtype)


def grouped(cases: list[Case]) -> dict[tuple[str, str, int, str], dict[str, Case]]:
    out: dict[tuple[str, str, int, str], dict[str, Case]] = {}
    for c in cases:
        out.setdefault(_key(c), {})[c.backend] = c
    return out


def _cell(c: Case | None) -> str:
    if c is None:
        return "-"
    mark = "" if c.passed else " FAIL"
    return f"{c.max_error:.1e} ({100 * c.argmax_agree:.0f}%){mark}"


def print_tables(cases: list[Case], detections: list[Detection], backends: list[str]) -> None:
    rows = []
    for (family, layout, workers, dtype), by in grouped(cases).items():
        first = next(iter(by.values()))
        hf = "-" if first.hf_error is None else f"{first.hf_error:.1e}"
        rows.append(
            [family, layout, str(workers), dtype, f"{first.tolerance:.1e}", hf]
            + [_cell(by.get(b)) for b in backends]
        )
    common.print_table(
        "Engine vs float64 oracle: max error / logit spread (argmax agreement)",
        ["family", "layout", "workers", "dtype", "tolerance", "hf bf16", *backends],
        rows,
    )
    common.print_table(
        "Wrong variants: error / logit spread, margin = error / tolerance",
        ["variant", "family", "layout", "workers", "dtype", "error", "tolerance", "margin"],
        [
            [
                d.variant,
                d.family,
                d.layout,
                str(d.workers),
                d.dtype,
                f"{d.max_error:.1e}",
                f"{d.tolerance:.1e}",
                f"{d.margin:.3g}",
            ]
            for d in detections
        ],
    )


def markdown(cases: list[Case], detections: list[Detection], backends: list[str]) -> str:
    head = ["family", "layout", "workers", "dtype", "tolerance", "hf bf16", *backends]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (family, layout, workers, dtype), by in grouped(cases).items():
        first = next(iter(by.values()))
        hf = "" if first.hf_error is None else f"{first.hf_error:.1e}"
        cells = [family, layout, str(workers), dtype, f"{first.tolerance:.1e}", hf]
        lines.append("| " + " | ".join(cells + [_cell(by.get(b)) for b in backends]) + " |")
    lines += [
        "",
        "| variant | family | layout | workers | dtype | error | tolerance | margin |",
        "|" + "---|" * 8,
    ]
    for d in detections:
        cells = [d.variant, d.family, d.layout, str(d.workers), d.dtype, f"{d.max_error:.1e}"]
        lines.append("| " + " | ".join([*cells, f"{d.tolerance:.1e}", f"{d.margin:.3g}"]) + " |")
    return "\n".join(lines) + "\n"


def plot(axes: Any, cases: list[Case]) -> None:
    ax = axes[0]
    backends = sorted({c.backend for c in cases})
    for b in backends:
        mine = [c for c in cases if c.backend == b]
        ax.scatter(range(len(mine)), [c.max_error / c.tolerance for c in mine], label=b, s=12)
    ax.axhline(1.0, color="red", linewidth=1, label="tolerance")
    ax.set_yscale("log")
    ax.set_xlabel("case (family x dtype x layout x workers)")
    ax.set_ylabel("max error / tolerance")
    ax.set_title("engine vs float64 oracle")
