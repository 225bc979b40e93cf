"""The attention backends by name, the one ``auto`` picks, and the Triton pieces, which are imported on first
use: triton is optional, and reads TRITON_INTERPRET when its kernels are defined."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import TYPE_CHECKING, Union

import torch

from engine.layers.attention import CpuAttention, ReferenceAttention, VectorizedAttention
from engine.layers.cpu_kernels import ATTENTION_HEAD_DIMS, load_cpu_kernels
from engine.layers.ops import TorchOps

if TYPE_CHECKING:
    from engine.layers.triton_attention import TritonAttention


def _triton_attention() -> TritonAttention:
    from engine.layers.triton_attention import TritonAttention

    return TritonAttention()


def _triton_runs(device: torch.device, dtype: torch.dtype) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    from engine.layers.triton_attention import kernel_runs

    return kernel_runs(device, dtype)


def resolve_attention(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, cpu_kernels: bool = True
) -> str:
    """``auto`` is the Triton kernel on CUDA when triton is installed and its kernels run, the C++ kernel on a
    CPU that builds it (float32 and bfloat16, its head dims), else the vectorized torch path."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "triton" if _triton_runs(device, dtype) else "vectorized"
    usable = (
        device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and head_dim in ATTENTION_HEAD_DIMS
    )
    return "cpu" if usable and cpu_kernels and load_cpu_kernels() else "vectorized"


Attention = Union[ReferenceAttention, VectorizedAttention, CpuAttention, "TritonAttention"]
ATTENTION_BACKENDS: dict[str, Callable[[], Attention]] = {
    "reference": ReferenceAttention,
    "vectorized": VectorizedAttention,
    "cpu": CpuAttention,
    "triton": _triton_attention,
}


def triton_ops() -> TorchOps:
    """The Triton versions of the small ops (engine/layers/triton_ops.py)."""
    from engine.layers.triton_ops import TritonOps

    return TritonOps()
