"""Decode steps replayed from CUDA graphs (docs/ARCHITECTURE.md, "CUDA graphs").

A decode step of a few rows launches about fifteen kernels per layer, each too short to hide its launch;
replaying a captured CUDA graph launches them all at once. A graph fixes every shape and address, so a step
is padded to fit one:

- its tokens to a *bucket* (1, 2, 4, 8, 16, 24, ... 256): pad tokens write their K/V to the pool's spare
  slot and own no attention partials, so their outputs are zeros that nobody reads;
- its kernel plan to the graph's sizes (KernelPlan.padded): pad items attend nothing, so the attention
  kernel's grid is fixed and the extra programs end at once;
- its inputs go into the graph's static buffer in the usual single non-blocking copy (Staging).

One graph per (token bucket, tile width). A step whose plan outgrows its graph (more keys, pieces, offsets,
items or partials: contexts grow) re-captures it with those sizes rounded up to powers of 2, so a job of
growing context re-captures O(log context) times. The first step at a new shape runs eagerly and is
captured right after (the eager run also compiles the Triton kernels for those shapes, which must not happen
during a capture). Steps of more than 256 tokens (prefill chunks) run eagerly.

With ``capture=False`` the same padded static steps run eagerly: the tests check this path on the CPU,
where CUDA graphs do not exist.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from engine.layers.kernel_plan import KernelPlan, PlanSize
from engine.step_batch import Staging, StepBatch

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

TOKEN_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Sizes a first capture holds at least, so that a young job's growth does not re-capture at every step.
MIN_SIZE = PlanSize(keys=4096, pieces=64, rots=64, items=64, parts=256, tokens=0, tile=0)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass
class Graph:
    size: PlanSize
    buffer: torch.Tensor  # the static inputs, int32, on the device
    batch: StepBatch  # its views of ``buffer``
    hidden: torch.Tensor  # the output: hidden states at the padded ``last``
    graph: torch.cuda.CUDAGraph | None


class StepGraphs:
    def __init__(self, runner: ModelRunner, capture: bool = True):
        self.runner, self.capture = runner, capture
        self.graphs: dict[tuple[int, int], Graph] = {}
        # One memory pool for all graphs: they are replayed one at a time and each one's inputs and outputs
        # live outside it, so their intermediates may share memory.
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0
        self.replays = 0

    def run(self, batch: StepBatch) -> torch.Tensor | None:
        """Hidden states at ``batch.last`` (a host batch with a KernelPlan), or None for a step too large for
        any bucket, which the caller runs eagerly."""
        plan = batch.plan
        assert isinstance(plan, KernelPlan)
        tokens = next((b for b in TOKEN_BUCKETS if b >= len(batch.ids)), None)
        if tokens is None:
            return None
        tile = next_power_of_2(plan.tile)
        graph = self.graphs.get((tokens, tile))
        need = plan.size
        if graph is None or not graph.size.holds(need):
            have = graph.size if graph is not None else MIN_SIZE
            grown = {
                f.name: max(getattr(have, f.name), next_power_of_2(getattr(need, f.name)))
                for f in fields(need)
            }
            size = PlanSize(**{**grown, "tokens": tokens, "tile": tile})
            return self._capture(batch, size)[: len(batch.last)]
        self.runner.staging.send(batch.padded(graph.size, self.runner.spare_slot).tensors, out=graph.buffer)
        if graph.graph is None:
            graph.hidden = self.runner.forward(graph.batch)
        else:
            graph.graph.replay()
        self.replays += 1
        return graph.hidden[: len(batch.last)]

    def _capture(self, batch: StepBatch, size: PlanSize) -> torch.Tensor:
        """Runs the step on a new static buffer, then captures it there; returns the step's result."""
        key = (size.tokens, size.tile)
        self.graphs.pop(key, None)  # the old graph's memory goes back to the pool first
        padded = batch.padded(size, self.runner.spare_slot)
        buffer = torch.empty(sum(Staging.spans(padded.tensors)), dtype=torch.int32, device=self.runner.device)
        static = padded.with_tensors(self.runner.staging.send(padded.tensors, out=buffer))
        hidden = out = self.runner.forward(static)
        graph = None
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.runner.forward(static)
        self.graphs[key] = Graph(size, buffer, static, out, graph)
        self.captures += 1
        return hidden
