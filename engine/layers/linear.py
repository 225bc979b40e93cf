"""Linear layers that hand small batches to the CPU bfloat16 kernel (engine/layers/cpu_kernels.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Decode steps (one row per worker); prefill chunks go to oneDNN's blocked GEMM, made for many rows.
KERNEL_MAX_ROWS = 16
Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Linear(nn.Linear):
    """``nn.Linear`` that sends at most ``KERNEL_MAX_ROWS`` rows to ``kernel`` when the model set one."""

    kernel: Kernel | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None or x.shape[0] > KERNEL_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = self.kernel(x, self.weight)
        return y if self.bias is None else y + self.bias

    def fits_kernel(self) -> bool:
        """The kernel's contract: a contiguous bfloat16 CPU weight, inputs a multiple of 32, outputs of 4."""
        out_features, in_features = self.weight.shape
        return (
            self.weight.device.type == "cpu"
            and self.weight.dtype == torch.bfloat16
            and self.weight.is_contiguous()
            and in_features % 32 == 0
            and out_features % 4 == 0
        )
