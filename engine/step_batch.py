"""A step's inputs as int32 tensors, planned on the host and sent to the device in one copy: what the model
runner runs eagerly and what a CUDA graph's static buffers hold (engine/step_graphs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.layers.kernel_plan import KernelPlan, PlanSize


@dataclass
class StepBatch:
    """A step's inputs as int32 tensors: on the host when planned, on the device once sent."""

    ids: torch.Tensor  # [N] the rows' new tokens, packed row after row
    write_slots: torch.Tensor  # [N] pool slot of each new token
    q_pos: torch.Tensor  # [N] view position of each query
    k_pos: torch.Tensor  # [N] block-local position of each new key
    last: torch.Tensor  # [R] packed index of each token whose logits are wanted
    plan: Any  # the attention's plan (a KernelPlan goes with the tensors above); when packed, the row specs

    @property
    def tensors(self) -> list[torch.Tensor]:
        own = [self.ids, self.write_slots, self.q_pos, self.k_pos, self.last]
        return own + self.plan.tensors if isinstance(self.plan, KernelPlan) else own

    def with_tensors(self, tensors: list[torch.Tensor]) -> StepBatch:
        ids, write_slots, q_pos, k_pos, last, *rest = tensors
        plan = self.plan.with_tensors(rest) if isinstance(self.plan, KernelPlan) else self.plan
        return StepBatch(ids, write_slots, q_pos, k_pos, last, plan)

    def padded(self, size: PlanSize, spare_slot: int) -> StepBatch:
        """The batch (with a KernelPlan) grown to a CUDA graph's sizes: ``size.tokens`` tokens and as many
        ``last`` entries, whose pads write to the spare slot, which nothing reads, and the plan padded."""

        def pad(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([x, x.new_full((size.tokens - len(x),), value)])

        return StepBatch(
            ids=pad(self.ids, 0),
            write_slots=pad(self.write_slots, spare_slot),
            q_pos=pad(self.q_pos, 0),
            k_pos=pad(self.k_pos, 0),
            last=pad(self.last, 0),
            plan=self.plan.padded(size),
        )


ALIGN = 4  # int32s: 16 bytes


class Staging:
    """Sends host int32 tensors to the device in one copy. On CUDA they are packed into a pinned buffer and
    copied without blocking the host; the buffer is refilled only after its last copy has run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host: torch.Tensor | None = None
        self.copied = torch.cuda.Event() if device.type == "cuda" else None

    @staticmethod
    def spans(tensors: list[torch.Tensor]) -> list[int]:
        """Each tensor's room in the packed buffer: its size rounded up to 16 bytes, so that every tensor
        starts aligned (Triton compiles a kernel variant per alignment of its pointer arguments)."""
        return [-(-t.numel() // ALIGN) * ALIGN for t in tensors]

    def send(self, tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The tensors on the device, as views of ``out`` (a new buffer if None; on the CPU, themselves)."""
        if out is None and self.device.type == "cpu":
            return tensors
        spans = self.spans(tensors)
        total = sum(spans)
        if out is None:
            out = torch.empty(total, dtype=torch.int32, device=self.device)
        if self.copied is None:
            host = out
        else:
            if self.host is None or len(self.host) < total:
                self.host = torch.empty(max(total, 1 << 16), dtype=torch.int32, pin_memory=True)
            self.copied.synchronize()
            host = self.host
        for t, room in zip(tensors, host[:total].split(spans), strict=True):
            room[: t.numel()] = t.flatten()
        if self.copied is not None:
            out[:total].copy_(host[:total], non_blocking=True)
            self.copied.record()
        views = out[:total].split(spans)
        return [v[: t.numel()].view(t.shape) for v, t in zip(views, tensors, strict=True)]
