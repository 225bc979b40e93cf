"""Tensor parallelism over torch.distributed: one model split across ranks, each with its share of the pool.

Megatron's split, as gpt-fast applies it to a model that was written for one device: q/k/v and gate/up are
split by output columns (whole heads, whole MLP channels), o_proj and down_proj by input rows, whose
partial sums one all-reduce each adds up; the LM head is split by vocabulary and its logits gathered. A
rank holds only its KV heads, so its pool holds only theirs, and the Hogwild attention (blocks, views,
rotated queries) runs on each rank unchanged: it never mixes heads. Where a model has fewer KV heads than
ranks, each KV head is copied to the ranks whose query heads read it, as vLLM does.

Rank 0 is the engine: it schedules, plans and samples. The others are *followers*: processes that hold a
shard and run what rank 0 broadcasts, one command per forward pass (the step's rows, packed on the host) or
per rollover (a page move). Commands go over a gloo group, so the host plan never visits a GPU; the
collectives of the forward go over NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.connection import bind_to_parent
from engine.layers.cpu_kernels import linear_kernel
from engine.layers.rotary import Rotary
from engine.model_runner import ModelRunner
from engine.models.llama import DecoderLayer, LlamaModel, ModelShape
from engine.pages import PagePool

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank that stops answering fails the step, not the machine


def check_divides(shape: ModelShape, world: int) -> None:
    """Refuse a split that would cut a head or an MLP channel group unevenly, naming what does not divide."""
    kv = shape.num_kv_heads
    problems = [
        f"{shape.num_heads} attention heads" if shape.num_heads % world else "",
        f"{kv} KV heads" if kv % world and world % kv else "",
        f"an MLP of {shape.intermediate_size}" if shape.intermediate_size % world else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(
            f"tensor_parallel={world} does not divide {' and '.join(problems)}; "
            "use a number of ranks that divides the heads (and the KV heads, or is a multiple of them)"
        )


def check_devices(device: torch.device, world: int) -> None:
    """Refuse more ranks than there are GPUs from ``device`` on (rank r runs on the r-th one after it)."""
    if device.type == "cuda" and world > 1 and (device.index or 0) + world > torch.cuda.device_count():
        raise ValueError(
            f"tensor_parallel={world} from {device} needs {world} GPUs; "
            f"this machine has {torch.cuda.device_count()}"
        )


def kv_heads_of(shape: ModelShape, rank: int, world: int) -> range:
    """The KV heads rank ``rank`` holds: its share, or the one head its query heads read."""
    kv = shape.num_kv_heads
    if kv >= world:
        return range(rank * kv // world, (rank + 1) * kv // world)
    head = rank // (world // kv)
    return range(head, head + 1)


def shard_state(
    state: dict[str, torch.Tensor], shape: ModelShape, rank: int, world: int
) -> dict[str, torch.Tensor]:
    """A transformers checkpoint cut down to rank ``rank``'s share (still in the checkpoint's names), for
    ``LlamaModel(shape.sharded(world)).load_hf_state``. The row-split layers' biases stay on rank 0 only:
    the all-reduce adds them once."""
    if world == 1:
        return state
    d, heads = shape.head_dim, shape.num_heads // world
    kv = kv_heads_of(shape, rank, world)
    q = slice(rank * heads * d, (rank + 1) * heads * d)
    k = slice(kv.start * d, kv.stop * d)
    mlp = shape.intermediate_size // world
    m = slice(rank * mlp, (rank + 1) * mlp)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        layer = name.split(".")[-2]  # q_proj, o_proj, down_proj ...
        is_bias = name.endswith(".bias")
        if layer == "q_proj":
            t = t[q]
        elif layer in ("k_proj", "v_proj"):
            t = t[k]
        elif layer in ("gate_proj", "up_proj"):
            t = t[m]
        elif layer in ("o_proj", "down_proj"):
            t = (t if rank == 0 else torch.zeros_like(t)) if is_bias else t[:, q if layer == "o_proj" else m]
        out[name] = t.contiguous()
    rows = shape.sharded(world).lm_head_rows
    head = state["model.embed_tokens.weight" if shape.tie_embeddings else "lm_head.weight"]
    part = head[rank * rows : (rank + 1) * rows]
    out["lm_head.weight"] = torch.cat([part, part.new_zeros(rows - len(part), part.shape[1])])
    return out


def parallelize(model: LlamaModel, vocab_size: int) -> None:
    """Add the forward's collectives to a model built from a shard: an all-reduce after o_proj and
    down_proj, and a gather of the LM head's slices of the vocabulary (its padding cut off)."""
    world = dist.get_world_size()

    def all_reduce(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out)
        return out

    def gather(_module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous())
        return torch.cat(parts, dim=-1)[..., :vocab_size]

    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        layer.self_attn.o_proj.register_forward_hook(all_reduce)
        layer.mlp.down_proj.register_forward_hook(all_reduce)
    model.lm_head.register_forward_hook(gather)


@dataclass
class RankSetup:
    """What every rank needs to build its share of the model and its runner; sent to each follower."""

    config: Any  # the transformers config (RoPE)
    state: dict[str, torch.Tensor]  # the whole checkpoint; crossing to a follower, in shared memory
    shape: ModelShape  # the whole model's
    world: int
    device: str  # rank 0's; rank r runs on the r-th device after it (cuda:0 -> cuda:r)
    dtype: torch.dtype
    runner: dict[str, Any] = field(default_factory=dict)  # the ModelRunner's options, resolved on rank 0
    num_pages: int = 0
    page_size: int = 16
    cpu_kernels: bool = True
    threads: int = 1

    def device_of(self, rank: int) -> torch.device:
        device = torch.device(self.device)
        if device.type != "cuda":
            return device
        return torch.device("cuda", (device.index or 0) + rank)


class RankLost(RuntimeError):
    """A follower is gone: no step can run until the engine is started again."""


class Followers:
    """Rank 0's side: the follower processes, the process group, and the broadcast of commands."""

    def __init__(self, setup: RankSetup):
        ctx = mp.get_context("spawn")
        store = dist.TCPStore(
            "127.0.0.1", 0, setup.world, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False
        )
        self.processes = [
            ctx.Process(
                target=follow,
                args=(setup, rank, store.port, os.getpid()),
                name=f"hogwild-rank{rank}",
                daemon=True,
            )
            for rank in range(1, setup.world)
        ]
        for p in self.processes:
            p.start()
        self.group = join(setup, 0, store)

    def built(self, error: str | None) -> None:
        """Wait for every rank to have built its shard; if any failed (or this one), stop them all and raise
        the failures, so that a bad split or a GPU short of memory fails the start, not the first step."""
        errors = [e for e in report_built(self.group, error) if e]
        if errors:
            for p in self.processes:
                p.join(timeout=30)
            dist.destroy_process_group()
            raise ValueError("tensor-parallel ranks failed to start: " + "; ".join(errors))

    def send(self, name: str, *args: Any) -> None:
        """Have every follower call ``ModelRunner.<name>(*args)``, as rank 0 is about to."""
        lost = self.lost()
        if lost:
            raise RankLost(lost)
        dist.broadcast_object_list([(name, args)], src=0, group=self.group)

    def lost(self) -> str | None:
        """Why the ranks can no longer step together (a follower exited), or None while they can."""
        gone = [
            f"rank {i} exited with status {p.exitcode}"
            for i, p in enumerate(self.processes, 1)
            if not p.is_alive()
        ]
        return "; ".join(gone) or None

    def close(self) -> None:
        """Stop the followers and leave the process group (a later engine in this process may make one)."""
        if not dist.is_initialized():
            return
        try:
            self.send("stop")
        except RuntimeError as exc:  # a follower already gone: the others end with the process group
            log.warning("stopping the tensor-parallel ranks: %s", exc)
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        dist.destroy_process_group()


def build_runner(setup: RankSetup, rank: int, pool: PagePool, peers: Followers | None = None) -> ModelRunner:
    """Rank ``rank``'s share of the model, loaded and wired for the others, and the runner that owns its
    share of the pool. Rank 0 (and an engine of one rank) passes the engine's pool and its followers."""
    shape, device = setup.shape.sharded(setup.world), setup.device_of(rank)
    state = shard_state(setup.state, setup.shape, rank, setup.world)
    model = LlamaModel.load(shape, state, device, setup.dtype)
    kernel = linear_kernel(device, setup.dtype, setup.cpu_kernels)
    if kernel is not None:
        model.use_kernel(kernel)
    if setup.world > 1:
        parallelize(model, setup.shape.vocab_size)
    rotary = Rotary(setup.config, shape.head_dim, device)
    return ModelRunner(model, rotary, pool, dtype=setup.dtype, peers=peers, **setup.runner)


def join(setup: RankSetup, rank: int, store: dist.Store) -> dist.ProcessGroup | None:
    """Join the process group; the group for commands (gloo; None: the default group is gloo already)."""
    backend = "nccl" if setup.device_of(rank).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(setup.device_of(rank))
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=setup.world, timeout=COLLECTIVE_TIMEOUT
    )
    return dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if backend == "nccl" else None


def report_built(group: dist.ProcessGroup | None, error: str | None) -> list[str | None]:
    """Every rank's error in building its shard (None: built); a rank that sees one goes no further."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=group)
    return errors if any(errors) else []


def follow(setup: RankSetup, rank: int, port: int, parent: int) -> None:
    """A follower's life: build its shard, then run rank 0's commands until told to stop."""
    bind_to_parent(parent)  # rank 0 killed: nobody would ever send the next command
    torch.set_num_threads(setup.threads)
    store = dist.TCPStore("127.0.0.1", port, setup.world, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    group = join(setup, rank, store)
    try:
        runner = build_runner(setup, rank, PagePool(setup.num_pages, setup.page_size, prefix_cache=False))
    except Exception as exc:
        report_built(group, f"rank {rank}: {type(exc).__name__}: {exc}")
        raise
    setup.state.clear()  # the shard is copied; the shared checkpoint is no longer ours to hold
    if report_built(group, None):
        dist.destroy_process_group()
        return
    box: list[Any] = [None]
    while True:
        dist.broadcast_object_list(box, src=0, group=group)
        name, args = box[0]
        if name == "stop":
            break
        getattr(runner, name)(*args)
    dist.destroy_process_group()
