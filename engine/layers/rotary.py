"""Rotary position embeddings, kept as composable rotations.

Hogwild stores keys rotated by their block-local position and later rotates them again (by a block's
offset in a view, or by ``len(common)`` at rollover). That only works when rotations compose, so the
frequencies come from transformers' own RoPE init functions and dynamic NTK, whose frequencies depend on
the sequence length, is refused.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

COMPOSABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The model cannot be served by this engine; the message says why."""


def rope_type_of(config: PretrainedConfig) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return str(params.get("rope_type", params.get("type", "default")))


class Rotary:
    """Cos/sin tables for RoPE; ``scaling`` is YaRN's attention factor, applied to q and k only."""

    def __init__(self, config: PretrainedConfig, head_dim: int, device: torch.device):
        rope_type = rope_type_of(config)
        if rope_type not in COMPOSABLE_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported: Hogwild re-rotates cached keys, which needs "
                f"position-independent frequencies ({', '.join(COMPOSABLE_ROPE_TYPES)})"
            )
        if rope_type == "default":
            theta = config.rope_parameters["rope_theta"]
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            scaling = 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device=None)
        self.device = device
        self.inv_freq = inv_freq.float().to(device)
        self.scaling = float(scaling)

    def cos_sin(self, positions: torch.Tensor, scaled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos/sin [..., head_dim] for integer positions; ``scaled`` applies the attention factor."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if scaled and self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotation (cos, sin) to x [..., head_dim] (the rotate-half convention of Llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
