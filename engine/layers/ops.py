"""The small ops between a layer's matmuls: RMSNorm (with the residual add before it), SiLU x up, and the
epilogue of the q/k/v projection (q/k norms, RoPE, the new keys and values written into the pool).

``TorchOps`` writes them as torch ops, which is what transformers runs and what the reference and vectorized
attention paths use. Each is several kernels (an RMSNorm is a cast, a square, a
mean, a rsqrt, two products and a cast back): about 50 launches per Qwen3 layer, some 1,800 per step of a
36-layer model, which on a GPU costs milliseconds even replayed from a CUDA graph, against a weight-read
floor of about 5 ms. ``engine.layers.triton_ops.TritonOps`` (with the Triton attention) and ``CpuOps`` (with
the C++ attention) do each in one kernel, rounding to the model's dtype where these ops do, so they give
the same numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from engine.layers.rotary import rotate

if TYPE_CHECKING:
    from engine.models.llama import Attention
    from engine.models.step_inputs import StepInputs


class TorchOps:
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
        return weight * y.to(dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm of residual + x, residual + x): a layer's residual add and the norm after it."""
        residual = residual + x
        return self.rms_norm(residual, weight, eps), residual

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def qkv_epilogue(self, qkv: torch.Tensor, attn: Attention, layer: int, step: StepInputs) -> torch.Tensor:
        """Queries [N, heads, d], rotated by their view positions, from the q/k/v projection's output; the
        keys (rotated by their block-local positions) and values go to the step's pool slots."""
        s = attn.shape
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = q.view(-1, s.num_heads, s.head_dim)
        k = k.view(-1, s.num_kv_heads, s.head_dim)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        if (norms := attn.qk_norms) is not None:
            q = self.rms_norm(q, norms[0], s.rms_norm_eps)
            k = self.rms_norm(k, norms[1], s.rms_norm_eps)
        q = rotate(q, step.q_cos, step.q_sin)
        k = rotate(k, step.k_cos, step.k_sin)
        step.k_pool[layer].index_copy_(0, step.write_slots, k)
        step.v_pool[layer].index_copy_(0, step.write_slots, v)
        return q


class CpuOps(TorchOps):
    """The C++ kernels (engine/layers/csrc/ops.cpp): one pass per op, where the torch ops take a dispatch
    per cast, square, mean and product (about 15% of a CPU decode step of the default model)."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        out: torch.Tensor = torch.ops.hogwild_cpu.rms_norm(x, weight, eps)
        return out

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, summed = torch.ops.hogwild_cpu.add_rms_norm(x, residual, weight, eps)
        return out, summed

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.hogwild_cpu.silu_mul(gate_up)
        return out

    def qkv_epilogue(self, qkv: torch.Tensor, attn: Attention, layer: int, step: StepInputs) -> torch.Tensor:
        q: torch.Tensor = torch.ops.hogwild_cpu.qkv_epilogue(
            qkv.contiguous(),
            *(attn.qk_norms or (None, None)),
            attn.shape.rms_norm_eps,
            step.q_cos,
            step.q_sin,
            step.k_cos,
            step.k_sin,
            step.write_slots,
            step.k_pool[layer],
            step.v_pool[layer],
            attn.shape.num_heads,
        )
        return q
