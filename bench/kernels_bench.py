"""The Triton kernels compiled for NVIDIA GPUs, on any machine: registers, spills, shared memory, and whether
the attend kernel's K/V loads are pipelined (how many shared-memory buffers each loaded tile has), per
target, dtype, head_dim, query tile and pipeline depth.

Triton compiles to a cubin without a GPU (its wheel carries ptxas and cuobjdump). Each kernel is compiled
with the launch constants the engine uses (``attend_meta``, ``merge_meta``) and the specializations Triton's
JIT makes at a launch (pointers and strides divisible by 16: torch's allocations and our strides are), so
the code is the code a GPU would run. Registers and stack (spilled registers) come from cuobjdump. Nothing
is timed: the figures say whether a tile fits in registers and whether loads overlap compute, not how fast
the kernel runs. ``rows`` is a tile's query rows: tokens x GQA group (4 decode workers x 4 = 16).

Run it with ``TRITON_INTERPRET=0`` (the kernels are defined for the interpreter otherwise).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import common

TARGETS = {80: "A100", 90: "H100/H200"}
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FLOAT_ARGS = {"cos_ptr", "sin_ptr", "part_max_ptr", "part_sum_ptr", "part_out_ptr", "qk_scale"}
MODEL_ARGS = {"q_ptr", "k_ptr", "v_ptr", "out_ptr"}  # of the model's dtype
LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass
class Compiled:
    kernel: str
    target: int
    dtype: str
    head_dim: int
    rows: int  # attend: query rows per tile; merge: heads per program
    block_m: int | None
    num_warps: int
    stages: int | None
    registers: int | None
    stack_bytes: int | None  # per-thread stack frame: spilled registers
    shared_bytes: int
    load_buffers: int  # shared-memory buffers per asynchronously loaded tile (0: loads are not pipelined)
    compile_s: float


def add_arguments(p: argparse.ArgumentParser) -> None:
    common.add_output_arguments(p)
    p.add_argument("--targets", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    p.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16", "float32"]
    )
    p.add_argument("--dims", type=int, nargs="+", default=[64, 80, 96, 128, 256], help="head dims")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64], help="query rows per tile")
    p.add_argument("--stages", type=int, nargs="+", default=[3], help="attend kernel pipeline stages")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")


def resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) of the cubin's one function, from cuobjdump; (None, None) without it."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None, None
    path = Path("/tmp") / f"hogwild-kernel-{time.monotonic_ns()}.cubin"
    try:
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "-res-usage", str(path)], capture_output=True, text=True).stdout
    finally:
        path.unlink(missing_ok=True)
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return (int(found[1]), int(found[2])) if found else (None, None)


def compile_kernel(fn: Any, dtype: torch.dtype, meta: dict[str, Any], target: int) -> tuple[Any, float]:
    """``fn`` compiled for ``target`` with ``meta``'s constants, as a launch with ``dtype`` tensors would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constants = {k: v for k, v in meta.items() if k not in LAUNCH_OPTIONS}

    def arg_type(name: str) -> str:
        if name in constants:
            return "constexpr"
        if name in MODEL_ARGS:
            return f"*{TYPE_NAMES[dtype]}"
        kind = "fp32" if name in FLOAT_ARGS else "i32"
        return f"*{kind}" if name.endswith("_ptr") else kind

    signature = {name: arg_type(name) for name in fn.arg_names}
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name.endswith("_ptr") or name.startswith("stride")
    }
    source = ASTSource(fn, signature, constexprs=constants, attrs=aligned)
    start = time.perf_counter()
    options = {k: v for k, v in meta.items() if k in LAUNCH_OPTIONS}
    compiled = triton.compile(source, target=GPUTarget("cuda", target, 32), options=options)
    return compiled, time.perf_counter() - start


def main(args: argparse.Namespace) -> int:
    from triton.runtime.interpreter import InterpretedFunction

    from engine.layers import triton_attention as kernels

    if isinstance(kernels._attend_kernel, InterpretedFunction):
        raise SystemExit("the kernels are defined for Triton's interpreter here: run with TRITON_INTERPRET=0")
    shape = (args.heads, args.group)
    figures: list[Compiled] = []
    for target in args.targets:
        for dtype in (getattr(torch, name) for name in args.dtypes):
            for dim in args.dims:
                cases = [
                    (
                        "attend",
                        kernels._attend_kernel,
                        rows,
                        kernels.attend_meta(rows, *shape, dim, dtype, stages),
                    )
                    for rows in args.rows
                    for stages in args.stages
                ]
                cases.append(("merge", kernels._merge_kernel, 1, kernels.merge_meta(args.heads, dim, 1)))
                for name, fn, rows, meta in cases:
                    compiled, seconds = compile_kernel(fn, dtype, meta, target)
                    registers, stack = resources(compiled.asm["cubin"])
                    buffers = re.findall(r"memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])
                    figures.append(
                        Compiled(
                            kernel=name,
                            target=target,
                            dtype=TYPE_NAMES[dtype],
                            head_dim=dim,
                            rows=rows,
                            block_m=meta.get("BLOCK_M"),
                            num_warps=meta["num_warps"],
                            stages=meta.get("num_stages"),
                            registers=registers,
                            stack_bytes=stack,
                            shared_bytes=int(compiled.metadata.shared),
                            load_buffers=max(map(int, buffers), default=0),
                            compile_s=seconds,
                        )
                    )
                    common.log(f"sm_{target} {name} {TYPE_NAMES[dtype]} d={dim} rows={rows}: {seconds:.1f} s")
    import triton

    common.print_table(
        f"Triton {triton.__version__} kernels compiled per target (registers and stack per thread)",
        [
            "kernel",
            "target",
            "dtype",
            "head_dim",
            "rows",
            "BLOCK_M",
            "warps",
            "regs",
            "stack B",
            "shared B",
            "stages",
            "buffers",
        ],
        [
            [
                f.kernel,
                f"sm_{f.target}",
                f.dtype,
                str(f.head_dim),
                str(f.rows),
                "-" if f.block_m is None else str(f.block_m),
                str(f.num_warps),
                "-" if f.registers is None else str(f.registers),
                "-" if f.stack_bytes is None else str(f.stack_bytes),
                str(f.shared_bytes),
                "-" if f.stages is None else str(f.stages),
                str(f.load_buffers),
            ]
            for f in figures
        ],
    )
    config = {
        "triton": triton.__version__,
        "targets": {f"sm_{t}": TARGETS.get(t, "") for t in args.targets},
        "heads": args.heads,
        "group": args.group,
    }
    path = common.output_path(args, "kernels")
    common.write_result(path, torch.device("cpu"), config, __doc__ or "", [asdict(f) for f in figures])
    if args.plot:
        plot(figures, path)
    return 0


def plot(figures: list[Compiled], path: Path) -> None:
    def draw(axes: Any) -> None:
        (ax,) = axes
        lines: dict[str, list[Compiled]] = {}
        for f in figures:
            if f.registers is not None:
                lines.setdefault(f"{f.kernel} sm_{f.target} {f.dtype} rows {f.rows}", []).append(f)
        for label, rows in lines.items():
            ax.plot([f.head_dim for f in rows], [f.registers for f in rows], "o-", label=label)
        ax.axhline(255, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("head_dim")
        ax.set_ylabel("registers per thread (255: the limit)")

    common.save_plot(draw, path)
