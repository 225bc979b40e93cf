"""``python -m bench engine [...]``: see bench/engine_bench.py."""

from __future__ import annotations

import argparse
import sys

from bench import engine_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="command", required=True)
    engine_bench.add_arguments(
        sub.add_parser("engine", help="engine decode throughput vs transformers generate")
    )
    args = parser.parse_args(argv)
    if args.command == "engine":
        return engine_bench.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
