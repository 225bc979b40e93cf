"""What every layer of a forward pass reads besides its own weights: shared by the model and the ops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.layers.ops import TorchOps


@dataclass
class StepInputs:
    """What every layer needs for one forward pass over the packed tokens of all rows."""

    write_slots: torch.Tensor  # [N] pool slot of each new token
    q_cos: torch.Tensor  # [N, 1, d] rotation of each query by its view position
    q_sin: torch.Tensor
    k_cos: torch.Tensor  # [N, 1, d] rotation of each new key by its block-local position
    k_sin: torch.Tensor
    k_pool: torch.Tensor  # [layers, slots, kv_heads, d]
    v_pool: torch.Tensor
    attention: Any  # an attention implementation from engine.layers.attention
    plan: Any  # its per-step plan
    ops: TorchOps  # norms, activation, RoPE and the pool writes (fused on the GPU)
