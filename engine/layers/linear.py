"""Linear layers, with a bfloat16 decode kernel for CPUs that have AVX512-BF16.

A CPU decode step multiplies a few rows by every weight once, so it costs the time to stream the weights
from memory; for one row oneDNN's bfloat16 path reaches about half of one core's read bandwidth, the kernel
in csrc/linear_bf16.cpp nearly all of it (docs/BENCHMARKS.md). It is compiled with the system's C++
compiler on first use and cached under the model cache; where that fails, ``F.linear`` does the work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# Above this many rows the kernel turns compute-bound and oneDNN's blocked GEMM is faster.
KERNEL_MAX_ROWS = 6
Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Linear(nn.Linear):
    """``nn.Linear`` that hands small batches of rows to ``kernel`` when the model set one."""

    kernel: Kernel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None or x.shape[0] > KERNEL_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = self.kernel(x, self.weight)
        return y if self.bias is None else y + self.bias

    def fits_kernel(self) -> bool:
        out_features, in_features = self.weight.shape
        return (
            self.weight.device.type == "cpu"
            and self.weight.dtype == torch.bfloat16
            and self.weight.is_contiguous()
            and in_features % 32 == 0
            and out_features % 4 == 0
        )


def cpu_has_bf16_dot() -> bool:
    """Native bfloat16 dot products (AVX512-BF16; AMX CPUs have it too)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags


@cache
def cpu_kernel() -> Kernel | None:
    """The compiled bfloat16 kernel, or None where the CPU or the toolchain cannot provide it."""
    if not cpu_has_bf16_dot():
        return None
    from torch.utils.cpp_extension import load

    from engine.loader import cache_dir

    build = cache_dir() / "kernels" / f"torch-{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]
    log.info("loading the CPU bfloat16 decode kernel (compiled once into %s)", build)
    try:
        load(
            name="hogwild_cpu",
            sources=[str(Path(__file__).parent / "csrc" / "linear_bf16.cpp")],
            extra_cflags=flags,
            build_directory=str(build),
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no ninja, an old toolchain: the slower path still works
        log.warning("CPU bfloat16 kernel unavailable, using F.linear: %s", str(e).strip()[-500:])
        return None
    kernel: Kernel = torch.ops.hogwild_cpu.linear_bf16
    return kernel
