"""The Triton kernels compiled for NVIDIA GPUs, on any machine: registers, spills, shared memory, and whether
the attend kernel's K/V loads are pipelined (how many shared-memory buffers each loaded tile has), per
target, dtype, head_dim, query tile and pipeline depth; and the fused small ops (engine/layers/triton_ops.py)
at a model shape.

Triton compiles to a cubin without a GPU (its wheel carries ptxas and cuobjdump). Each kernel is compiled
with the launch constants the engine uses (``attend_meta``, ``merge_meta``, ``norm_meta``, ...) and the
specializations Triton's JIT makes at a launch (pointers and strides divisible by 16: torch's allocations and
our strides are), so the code is the code a GPU would run. Registers and stack (spilled registers) come from
cuobjdump. Nothing is timed: the figures say whether a tile fits in registers and whether loads overlap
compute, not how fast the kernel runs. For the attention, ``rows`` is a tile's query rows: tokens x GQA
group (4 decode workers x 4 = 16); for the ops, the token rows of one program.

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
from engine.layers.kernel_plan import INDEX_FIELDS

TARGETS = {80: "A100", 90: "H100/H200"}
TYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FLOAT_ARGS = {"cos_ptr", "sin_ptr", "part_max_ptr", "part_sum_ptr", "part_out_ptr", "qk_scale", "eps"}
INDEX_ARGS = {f"{name}_ptr" for name in INDEX_FIELDS}  # the kernel plan's int32 tensors
LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass
class Compiled:
    kernel: str
    target: int
    dtype: str
    width: int  # head_dim (attention, qkv epilogue), hidden (norm) or intermediate size (silu)
    rows: int  # attend: query rows per tile; merge: heads per program; the ops: token rows per program
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
    p.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64], help="query rows per tile")
    p.add_argument("--stages", type=int, nargs="+", default=[3], help="attend kernel pipeline stages")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096, help="hidden size, for the norm")
    p.add_argument("--intermediate", type=int, default=12288, help="MLP width, for silu x up")
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
        if name == "slots_ptr":
            return "*i64"  # the step's write slots
        if name in INDEX_ARGS or name in FLOAT_ARGS:
            kind = "i32" if name in INDEX_ARGS else "fp32"
            return f"*{kind}" if name.endswith("_ptr") else kind
        return f"*{TYPE_NAMES[dtype]}" if name.endswith("_ptr") else "i32"  # tensors of the model's dtype

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


def cases(args: argparse.Namespace, dtype: torch.dtype) -> list[tuple[str, Any, int, int, dict[str, Any]]]:
    """(name, kernel, width, rows, launch constants) of every kernel to compile, with the engine's own
    constants: the attention kernels per head_dim, the fused ops at the model shape of the flags."""
    from engine.layers import triton_attention as attention
    from engine.layers import triton_ops as ops

    out = []
    for dim in args.dims:
        for rows in args.rows:
            for stages in args.stages:
                meta = attention.attend_meta(rows, args.heads, args.group, dim, dtype, stages)
                out.append(("attend", attention._attend_kernel, dim, rows, meta))
        out.append(("merge", attention._merge_kernel, dim, 1, attention.merge_meta(args.heads, dim, 1)))
        meta = ops.qkv_meta(args.heads, args.heads // args.group, dim, qk_norm=True)
        out.append(("qkv epilogue", ops._qkv_epilogue_kernel, dim, meta["BLOCK_T"], meta))
    for name, fn, width, meta in [
        ("add + rms_norm", ops._rms_norm_kernel, args.hidden, ops.norm_meta(args.hidden, add=True)),
        ("silu x up", ops._silu_mul_kernel, args.intermediate, ops.silu_meta(args.intermediate)),
    ]:
        out.append((name, fn, width, meta["BLOCK_T"], meta))
    return out


def main(args: argparse.Namespace) -> int:
    from triton.runtime.interpreter import InterpretedFunction

    from engine.layers import triton_attention

    if isinstance(triton_attention._attend_kernel, InterpretedFunction):
        raise SystemExit("the kernels are defined for Triton's interpreter here: run with TRITON_INTERPRET=0")
    figures: list[Compiled] = []
    for target in args.targets:
        for dtype in (getattr(torch, name) for name in args.dtypes):
            for name, fn, width, rows, meta in cases(args, dtype):
                compiled, seconds = compile_kernel(fn, dtype, meta, target)
                registers, stack = resources(compiled.asm["cubin"])
                buffers = re.findall(r"memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])
                figures.append(
                    Compiled(
                        kernel=name,
                        target=target,
                        dtype=TYPE_NAMES[dtype],
                        width=width,
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
                common.log(
                    f"sm_{target} {name} {TYPE_NAMES[dtype]} width {width} rows {rows}: {seconds:.1f} s"
                )
    import triton

    common.print_table(
        f"Triton {triton.__version__} kernels compiled per target (registers and stack per thread)",
        [
            "kernel",
            "target",
            "dtype",
            "width",
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
                str(f.width),
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
            if f.registers is not None and f.kernel in ("attend", "merge"):
                lines.setdefault(f"{f.kernel} sm_{f.target} {f.dtype} rows {f.rows}", []).append(f)
        for label, rows in lines.items():
            ax.plot([f.width for f in rows], [f.registers for f in rows], "o-", label=label)
        ax.axhline(255, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("head_dim")
        ax.set_ylabel("registers per thread (255: the limit)")

    common.save_plot(draw, path)
