"""``python -m bench {engine,jobs,prefill,attention,serve,reliability,kernels,oracle} [...]``: each prints
a table, writes JSON under bench/results/ and, with ``--plot``, a PNG beside it. ``--help`` after a
subcommand lists its flags."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from bench import (
    attention_bench,
    engine_bench,
    jobs_bench,
    kernels_bench,
    oracle_bench,
    prefill_bench,
    reliability_bench,
    serve_bench,
)

COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "engine": (engine_bench, "Hogwild decode vs transformers generate and vs independent jobs"),
    "jobs": (jobs_bench, "concurrent Hogwild jobs in one engine (continuous batching)"),
    "prefill": (prefill_bench, "inter-token latency of running jobs while a long prompt is admitted"),
    "attention": (attention_bench, "the Hogwild attention op alone vs plain decode attention"),
    "serve": (serve_bench, "load against a running server over HTTP"),
    "reliability": (
        reliability_bench,
        "bad inputs, fuzzing, churn, hang-ups, a stopped and a killed engine, a soak: 5xx, leaks, gaps",
    ),
    "kernels": (
        kernels_bench,
        "the Triton kernels compiled for sm_80/sm_90 on any machine: registers, spills",
    ),
    "oracle": (
        oracle_bench,
        "the engine against the float64 oracle per family, layout, workers, dtype, backend; wrong variants",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__))
    args = parser.parse_args(argv)
    module, _ = COMMANDS[args.command]
    return int(module.main(args))


if __name__ == "__main__":
    sys.exit(main())
