"""The C++ CPU kernels (csrc/): a bfloat16 small-batch linear, the Hogwild decode attention and the small
ops between a layer's matmuls (norms, SiLU x up, RoPE and the pool writes).

A CPU decode step is the time to stream the weights from memory plus a long tail of small tensor ops; for
one row oneDNN's bfloat16 path reaches about half of one core's read bandwidth, and the attention's gathers,
re-rotations, masks and matmuls are each a separate pass with its own dispatch. The kernels do both in one
pass (docs/BENCHMARKS.md). They are compiled with the system's C++ compiler on first use into the model
cache, in a folder keyed by what the build depends on (the sources, the flags, the compiler, torch), from
a copy of the sources kept there, so two checkouts of the same code share one build and a changed source
gets a build of its own; where the CPU lacks AVX512-BF16 or the build fails, the engine keeps the plain
torch paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
from functools import cache
from pathlib import Path

import torch

from engine.layers.linear import Kernel

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("linear.cpp", "attention.cpp", "ops.cpp")
HEADERS = ("simd.h",)
ATTENTION_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 128, 256)  # instances of the attention kernel's template
# -ffast-math lets gcc call glibc's vector exp (libmvec) in the softmax; the kernels use no infinities.
FLAGS = ["-O3", "-ffast-math", "-fopenmp-simd", "-mfma"] + [
    f"-mavx512{x}" for x in ("f", "bw", "vl", "dq", "bf16")
]


@cache
def cpu_has_bf16_dot() -> bool:
    """Native bfloat16 dot products (AVX512-BF16; AMX CPUs have it too). Read once: /proc/cpuinfo runs to
    hundreds of kilobytes on machines with many cores."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags


@cache
def load_cpu_kernels() -> bool:
    """Builds (first time) and loads the kernels as ``torch.ops.hogwild_cpu``; False where they cannot be."""
    if not cpu_has_bf16_dot():
        return False
    from engine.loader import timed

    try:  # torch runs `ninja` from PATH, which a virtual environment's scripts folder need not be on
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except ImportError:
        pass

    build = build_dir()
    try:
        with timed(f"loading the CPU kernels (compiled once into {build})"):
            build_kernels(build)
    except Exception as e:  # no compiler, no ninja, a read-only cache: the torch paths still work
        errors = [line for line in str(e).splitlines() if "error" in line.lower()][:3]
        log.warning("CPU kernels unavailable, using the torch paths: %s", " | ".join(errors) or e)
        return False
    return True


def linear_kernel(device: torch.device, dtype: torch.dtype, enabled: bool = True) -> Kernel | None:
    """The bfloat16 small-batch linear for a model on this CPU, or None where the torch path is used."""
    if enabled and device.type == "cpu" and dtype == torch.bfloat16 and load_cpu_kernels():
        return torch.ops.hogwild_cpu.linear_bf16
    return None


def build_dir() -> Path:
    """Where the kernels are built: one folder per torch version and build key, shared by every checkout."""
    from engine.loader import cache_dir

    return cache_dir() / "kernels" / f"torch-{torch.__version__}-{build_key()}"


def build_key() -> str:
    """A digest of everything the build depends on but torch's version, which names the folder."""
    digest = hashlib.blake2b(digest_size=8)
    for name in SOURCES + HEADERS:
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join(FLAGS).encode())
    compiler = os.environ.get("CXX", "c++")
    try:
        digest.update(subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout)
    except (OSError, subprocess.TimeoutExpired):
        digest.update(compiler.encode())
    return digest.hexdigest()


def build_kernels(build: Path) -> None:
    from torch.utils.cpp_extension import load

    sources = build / "src"
    sources.mkdir(parents=True, exist_ok=True)
    # torch's own lock is a file that a build killed half-way leaves behind, and then every later start
    # waits on it forever. An flock dies with its process: holding it, no build of ours is running, so
    # torch's file can only be stale.
    with open(build / "hogwild.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        for name in SOURCES + HEADERS:  # one path per build for every checkout, touched only if new
            code = (CSRC / name).read_bytes()
            copy = sources / name
            if not copy.exists() or copy.read_bytes() != code:
                copy.write_bytes(code)
        load(
            name="hogwild_cpu",
            sources=[str(sources / name) for name in SOURCES],
            extra_cflags=FLAGS,
            extra_ldflags=["-lmvec"],
            build_directory=str(build),
            is_python_module=False,
        )
