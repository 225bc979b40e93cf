"""Independent reference Hogwild! inference, built only on transformers' own model forward.

This is the test oracle for the engine (docs/ARCHITECTURE.md, "Trace and oracle"). It shares no code with
``engine/``: it reads only the trace records of ``engine/trace.py`` (and only for type hints).

The approach is the paper's original, naive one:

* A ``transformers.Cache`` subclass keeps, per block name and per layer, every token's key exactly as the
  model produced it (already rotated by RoPE at its *author position*: the view position the token had when
  it was computed), that author position, and the value.
* Each trace step goes through ONE batched forward of the unmodified transformers model (left-padded
  ``input_ids``, explicit ``position_ids`` = the view positions of the new tokens, and a hand-built 4D mask).
* In ``Cache.update`` (called by every attention layer after RoPE), every row's new keys/values are first
  appended to the row's block; then, for every row, the keys of its view are gathered in view order and each
  key is re-rotated from its author position ``a`` to its position ``p`` in this row's view by the pure
  rotation ``R(p - a)`` (no attention scaling factor). Writing before reading gives same-step visibility.
* After the forward, the step's rollovers move a finished block to the end of another one; keys keep their
  author positions, so the next step's re-rotation places them correctly.

Precision: the oracle is a float64 copy of the model (``float64_copy``). transformers computes RoPE angles
and RMSNorm in float32 whatever the model's dtype, so while a float64 model is replayed those two (and only
those) are swapped for the same formulas in float64; models of any other dtype run exactly as transformers
runs them, which is what gives transformers' own bfloat16 error on a trace (tests/test_oracle.py).

Sampling: ``redraw`` re-implements the draw a sampled job's trace records (logit bias, temperature, top-k,
top-p, then the inverse CDF at the recorded uniform) on the reference's own float64 logits.

``Variant`` replays a deliberately wrong Hogwild! (no same-step visibility, keys left at block-local
positions, YaRN's attention factor applied twice): the oracle's tests show that each is detected.

Only models whose attention applies RoPE to q and k and then calls
``cache.update(key_states, value_states, layer_idx, ...)`` are supported (Llama, Mistral, Qwen2, Qwen3, ...),
with RoPE types whose frequencies do not depend on the sequence length (default, linear, llama3, yarn).
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import Cache, PreTrainedModel

if TYPE_CHECKING:
    from engine.trace import TraceStep

__all__ = [
    "WRONG_VARIANTS",
    "Redraw",
    "Variant",
    "biased_logits",
    "float64_copy",
    "float64_math",
    "redraw",
    "replay",
    "rotary_of",
]

# RoPE types whose inverse frequencies change with the sequence length: rotations do not compose.
_UNSUPPORTED_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class Variant:
    """A deliberately wrong Hogwild!, to show that the oracle's tolerance detects such mistakes.

    ``hide_same_step``: a row does not see the tokens the other rows of its step write (the cache is read
    before it is written). ``block_local_keys``: keys are placed at their position inside their block, not
    at the block's offset in the view (a view's re-rotation forgotten). ``yarn_twice``: the re-rotation of
    keys applies the RoPE attention factor (YaRN's) once more, so keys carry it twice.
    """

    hide_same_step: bool = False
    block_local_keys: bool = False
    yarn_twice: bool = False


CORRECT = Variant()
WRONG_VARIANTS = {
    "no same-step visibility": Variant(hide_same_step=True),
    "keys at block-local positions": Variant(block_local_keys=True),
    "yarn factor applied twice": Variant(yarn_twice=True),
}


@dataclass
class _LayerKV:
    """One block's cache for one layer."""

    keys: torch.Tensor  # [kv_heads, n, head_dim], rotated by RoPE at the author positions
    values: torch.Tensor  # [kv_heads, n, head_dim]
    author_pos: torch.Tensor  # [n] int64


@dataclass
class _RowPlan:
    block: str
    n_new: int  # tokens this row appends to ``block`` in this step
    pad_q: int  # left padding of the row's queries (Tmax - n_new)
    view: list[tuple[str, int]]
    new_pos: torch.Tensor  # [n_new] int64: view positions of the new tokens (their author positions)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class HogwildReferenceCache(Cache):
    """Naive Hogwild! cache: raw keys per block with their author positions, re-rotated to every view."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0, variant: Variant = CORRECT):
        super().__init__(layers=[])
        # float64 so that the re-rotation adds no error of its own.
        self._inv_freq = inv_freq.detach().to(torch.float64)
        self._attention_scaling = attention_scaling
        self._variant = variant
        self._blocks: dict[str, dict[int, _LayerKV]] = {}
        self._plan: list[_RowPlan] | None = None
        self._kv_len = 0  # Lmax of the current step

    # ---- step bookkeeping (driven by ``replay``) ----

    def begin_step(self, plan: list[_RowPlan], kv_len: int) -> None:
        self._plan = plan
        self._kv_len = kv_len

    def end_step(self) -> None:
        self._plan = None

    def block_len(self, name: str) -> int:
        layers = self._blocks.get(name)
        if not layers:
            return 0
        lengths = {kv.keys.shape[1] for kv in layers.values()}
        assert len(lengths) == 1, f"block {name!r} has different lengths across layers: {lengths}"
        return lengths.pop()

    def rollover(self, block: str, into: str, length: int) -> None:
        held = self.block_len(block)
        if held != length:
            raise ValueError(f"rollover of {block!r}: trace says {length} tokens, the block holds {held}")
        src = self._blocks.pop(block, {})
        dst = self._blocks.setdefault(into, {})
        for layer_idx, kv in src.items():
            old = dst.get(layer_idx)
            if old is None:
                dst[layer_idx] = kv
            else:
                dst[layer_idx] = _LayerKV(
                    keys=torch.cat([old.keys, kv.keys], dim=1),
                    values=torch.cat([old.values, kv.values], dim=1),
                    author_pos=torch.cat([old.author_pos, kv.author_pos]),
                )

    # ---- transformers Cache interface ----

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write every row's new K/V into its block, then return each row's keys/values in view order.

        ``key_states``/``value_states``: [R, kv_heads, Tmax, head_dim] (left-padded), keys already rotated at
        the positions passed as ``position_ids``. Returns [R, kv_heads, Lmax, head_dim], left-padded.
        """
        plan = self._plan
        if plan is None:
            raise RuntimeError("HogwildReferenceCache.update called outside of a replay step")
        n_rows, n_heads, _, head_dim = key_states.shape
        assert n_rows == len(plan), (n_rows, len(plan))

        # 1. Write: append every row's new (non-pad) tokens to its block, for this layer.
        for r, row in enumerate(plan):
            new = _LayerKV(
                keys=key_states[r, :, row.pad_q :, :],
                values=value_states[r, :, row.pad_q :, :],
                author_pos=row.new_pos,
            )
            layers = self._blocks.setdefault(row.block, {})
            old = layers.get(layer_idx)
            if old is None:
                layers[layer_idx] = new
            else:
                layers[layer_idx] = _LayerKV(
                    keys=torch.cat([old.keys, new.keys], dim=1),
                    values=torch.cat([old.values, new.values], dim=1),
                    author_pos=torch.cat([old.author_pos, new.author_pos]),
                )

        # 2. Read: every row's keys in view order, re-rotated to the row's view positions.
        lmax = self._kv_len
        out_k = key_states.new_zeros((n_rows, n_heads, lmax, head_dim))
        out_v = value_states.new_zeros((n_rows, n_heads, lmax, head_dim))
        variant = self._variant
        for r, row in enumerate(plan):
            keys: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
            offset = 0
            for name, length in row.view:
                kv = self._blocks.get(name, {}).get(layer_idx)
                held = 0 if kv is None else kv.keys.shape[1]
                assert held == length, (
                    f"layer {layer_idx}: view lists {name!r} with {length}, block holds {held}"
                )
                if kv is not None and length > 0:
                    local = torch.arange(length, device=kv.author_pos.device)
                    target = local if variant.block_local_keys else offset + local
                    delta = target - kv.author_pos
                    # R(0) is the identity: keys read where they were computed are returned as they are.
                    k = self._rerotate(kv.keys, delta) if bool(delta.any()) else kv.keys
                    if variant.yarn_twice:
                        k = k * self._attention_scaling
                    keys.append(k)
                    values.append(kv.values)
                offset += length
            k_row = torch.cat(keys, dim=1)
            v_row = torch.cat(values, dim=1)
            out_k[r, :, lmax - offset :, :] = k_row
            out_v[r, :, lmax - offset :, :] = v_row
        return out_k, out_v

    def _rerotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Apply the pure rotation R(delta) (rotate_half convention) to keys [kv_heads, n, head_dim]."""
        inv_freq = self._inv_freq.to(keys.device)
        rot_dim = 2 * inv_freq.numel()
        angles = delta.to(device=keys.device, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [n, rot/2]
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        k = keys.to(torch.float64)
        k_rot, k_pass = k[..., :rot_dim], k[..., rot_dim:]
        k_rot = k_rot * cos + _rotate_half(k_rot) * sin
        return torch.cat((k_rot, k_pass), dim=-1).to(keys.dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        # Not meaningful for a per-row, per-view cache: position_ids and the mask are always passed.
        return 0


def rotary_of(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder's rotary embedding, checked to be one whose rotations compose."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise NotImplementedError(f"{type(model).__name__}: no rotary_emb.inv_freq on the decoder")
    rope_type = getattr(rotary, "rope_type", "default")
    if not isinstance(rope_type, str):
        raise NotImplementedError(f"per-layer-type RoPE ({rope_type!r}) is not supported by the reference")
    if any(t in rope_type for t in _UNSUPPORTED_ROPE_TYPES):
        raise ValueError(
            f"RoPE type {rope_type!r} changes its frequencies with the length: rotations do not compose"
        )
    assert isinstance(rotary.inv_freq, torch.Tensor)
    return rotary


def _check_sliding_window(model: PreTrainedModel, max_view_len: int) -> None:
    config = model.config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return
    if max_view_len > window:
        raise NotImplementedError(f"view of {max_view_len} tokens exceeds the sliding window {window}")


def float64_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The oracle: a float64 copy of ``model`` (weights converted exactly), with SDPA attention (eager
    attention takes its softmax in float32)."""
    exact = copy.deepcopy(model)
    torch.nn.Module.to(exact, torch.float64)
    exact.eval()
    exact.set_attn_implementation("sdpa")
    return exact


@contextlib.contextmanager
def float64_math(model: PreTrainedModel, rotary: torch.nn.Module) -> Iterator[None]:
    """While a float64 model runs: RoPE angles and RMSNorm in float64, where transformers takes float32.

    The inverse frequencies are the model's own (its buffer, exact in float64), as is YaRN's factor."""
    buffer = getattr(rotary, "inv_freq")  # noqa: B009 (a buffer: typed as Tensor | Module)
    assert isinstance(buffer, torch.Tensor)
    inv_freq = buffer.detach().to(torch.float64)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))

    def rope(self: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[Any, Any]:
        freqs = position_ids[..., None].to(torch.float64) * inv_freq.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)

    def rms_norm(self: Any, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float64)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (self.weight * h).to(x.dtype)

    patched: list[tuple[torch.nn.Module, Callable[..., Any]]] = [(rotary, rope)]
    patched += [
        (m, rms_norm)
        for m in model.modules()
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon")
    ]
    for module, forward in patched:
        module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        for module, _ in patched:
            del module.forward


@torch.no_grad()
def replay(
    model: PreTrainedModel, trace: list[TraceStep], variant: Variant = CORRECT
) -> list[list[torch.Tensor | None]]:
    """Replay a job's trace through the reference.

    Returns, for every step and every row of that step, the reference's next-token logits at the row's last
    input token ([vocab]; float64 for a float64 model, else float32), or None for prefill rows
    (``worker == -1``).
    """
    attn_impl = model.config._attn_implementation
    if attn_impl not in ("eager", "sdpa"):
        raise ValueError(
            f"the reference needs attn_implementation 'eager' or 'sdpa', the model uses {attn_impl!r}"
        )
    device = model.device
    dtype = model.dtype
    rotary = rotary_of(model)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    assert isinstance(rotary.inv_freq, torch.Tensor)
    cache = HogwildReferenceCache(rotary.inv_freq, scaling, variant)
    results: list[list[torch.Tensor | None]] = []

    exact = float64_math(model, rotary) if dtype == torch.float64 else contextlib.nullcontext()
    with exact:
        for step_idx, step in enumerate(trace):
            if not step.rows:
                results.append([])
            else:
                results.append(_run_step(model, cache, step, step_idx, device, dtype, variant))
            for ro in step.rollovers:
                cache.rollover(ro.block, ro.into, ro.length)
    return results


def _run_step(
    model: PreTrainedModel,
    cache: HogwildReferenceCache,
    step: TraceStep,
    step_idx: int,
    device: torch.device,
    dtype: torch.dtype,
    variant: Variant,
) -> list[torch.Tensor | None]:
    rows = step.rows
    written = [row.block for row in rows]
    if len(set(written)) != len(written):
        raise ValueError(f"step {step_idx}: several rows write the same block: {written}")

    # Lengths every block will hold once this step's tokens are written (same-step visibility).
    after = {row.block: cache.block_len(row.block) + len(row.tokens) for row in rows}
    new_in = {row.block: len(row.tokens) for row in rows}

    tmax = max(len(row.tokens) for row in rows)
    plan: list[_RowPlan] = []
    view_lens: list[int] = []
    for r, row in enumerate(rows):
        where = f"step {step_idx}, row {r} (worker {row.worker}, block {row.block!r})"
        n_new = len(row.tokens)
        if n_new == 0:
            raise ValueError(f"{where}: no input tokens")
        if not row.view or row.view[-1][0] != row.block:
            raise ValueError(f"{where}: the row's block must be the last entry of its view {row.view}")
        names = [name for name, _ in row.view]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: a block appears twice in the view {row.view}")
        for name, length in row.view:
            held = after.get(name, cache.block_len(name))
            if held != length:
                raise ValueError(f"{where}: view lists {name!r} with {length} tokens, the block holds {held}")
        total = sum(length for _, length in row.view)
        start = total - n_new
        plan.append(
            _RowPlan(
                block=row.block,
                n_new=n_new,
                pad_q=tmax - n_new,
                view=list(row.view),
                new_pos=torch.arange(start, total, device=device, dtype=torch.long),
            )
        )
        view_lens.append(total)

    lmax = max(view_lens)
    _check_sliding_window(model, lmax)
    n_rows = len(rows)
    input_ids = torch.zeros((n_rows, tmax), dtype=torch.long, device=device)
    position_ids = torch.zeros((n_rows, tmax), dtype=torch.long, device=device)
    allowed = torch.zeros((n_rows, 1, tmax, lmax), dtype=torch.bool, device=device)
    key_slot = torch.arange(lmax, device=device)
    for r, (row, rp) in enumerate(zip(rows, plan, strict=True)):
        input_ids[r, rp.pad_q :] = torch.tensor(row.tokens, dtype=torch.long, device=device)
        position_ids[r, rp.pad_q :] = rp.new_pos
        pad_k = lmax - view_lens[r]
        key_pos = key_slot - pad_k  # view position of each key slot (negative: padding)
        key_real = key_slot >= pad_k
        if variant.hide_same_step:  # the other rows' tokens of this step are not there yet
            end = 0
            for name, length in row.view:
                end += length
                if name != row.block and name in new_in:
                    key_real &= (key_pos < end - new_in[name]) | (key_pos >= end)
        # Real queries: causal over real keys. Pad queries see every real key (never an empty row: no NaN).
        allowed[r, 0, :, :] = key_real[None, :]
        allowed[r, 0, rp.pad_q :, :] &= key_pos[None, :] <= rp.new_pos[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    # Prefill rows need no logits: a step of prefill rows only keeps none (the LM head is the costliest
    # product of a tiny model's step).
    prefill_only = all(row.worker == -1 for row in rows)
    keep: int | torch.Tensor = torch.zeros(0, dtype=torch.long, device=device) if prefill_only else 1
    cache.begin_step(plan, lmax)
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
    finally:
        cache.end_step()
    for name, length in after.items():
        assert cache.block_len(name) == length, (name, cache.block_len(name), length)
    if prefill_only:
        return [None] * len(rows)

    logits = out.logits[:, -1, :]
    logits = logits.double() if dtype == torch.float64 else logits.float()
    return [None if row.worker == -1 else logits[r] for r, row in enumerate(rows)]


# ---- sampling ------------------------------------------------------------------------------------------


def biased_logits(
    logits: torch.Tensor, logit_bias: tuple[tuple[int, float], ...] = (), banned: tuple[int, ...] = ()
) -> torch.Tensor:
    """The logits a token is chosen from, in float64 on the CPU: the bias added, banned ids at -inf."""
    z = logits.detach().to(device="cpu", dtype=torch.float64).clone()
    for token, bias in logit_bias:
        z[token] += bias
    if banned:
        z[list(banned)] = -math.inf
    return z


@dataclass(frozen=True)
class Redraw:
    """The reference's own draw of a sampled token at a recorded uniform.

    ``edge``: how far the uniform lies from the nearer end of the drawn token's interval of the normalized
    CDF. ``slack``: how far that CDF can move for logits that differ from the reference's by the given
    error (interval ends, and the mass of tokens whose top-k or top-p membership that error can flip). A
    draw with ``edge <= slack`` may legitimately differ from the engine's."""

    token: int
    edge: float
    slack: float

    @property
    def near_boundary(self) -> bool:
        return self.edge <= self.slack


def redraw(
    logits: torch.Tensor,
    u: float,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    logit_bias: tuple[tuple[int, float], ...] = (),
    banned: tuple[int, ...] = (),
    logit_error: float = 0.0,
) -> Redraw:
    """Draw from ``logits`` [vocab] as a sampled job does, in float64: add the logit bias, ban ``banned``,
    divide by the temperature, keep the top-k logits (ties at the k-th included), keep the most probable
    tokens until the mass before the next one reaches top_p (the top token always), then take the first
    token whose CDF exceeds ``u`` times the total. ``logit_error`` (max abs, before the temperature) sizes
    ``slack``."""
    z = biased_logits(logits, logit_bias, banned) / temperature
    # An error of e in every logit, plus the rounding of float32 logits divided by the temperature.
    err = logit_error / temperature + 2.0**-22 * float(z[z.isfinite()].abs().max())
    keep = torch.ones_like(z, dtype=torch.bool)
    uncertain = torch.zeros_like(keep)  # tokens whose membership an error of ``err`` could flip
    if top_k and top_k < z.numel():
        kth, next_one = torch.topk(z, top_k + 1).values[-2:]
        keep &= z >= kth
        if kth - next_one <= 2 * err:  # the k-th and the next could swap: every token near them could
            uncertain |= (z >= next_one - 2 * err) & (z <= kth + 2 * err)
    cdf_move = math.expm1(2 * err) / 4  # the largest shift of a normalized CDF value (see test_oracle)
    if top_p < 1:
        masked = z.masked_fill(~keep, -math.inf)
        ordered, order = torch.sort(masked, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(-1) - probs
        drop = torch.zeros_like(keep).scatter(0, order, before >= top_p)
        # A float32 implementation sums the kept probabilities with an error of up to one ulp per term.
        margin = cdf_move + int(keep.sum()) * 2.0**-24
        near_cut = torch.zeros_like(keep).scatter(0, order, (before - top_p).abs() <= margin)
        keep &= ~drop
        uncertain |= near_cut
    probs = torch.softmax(z.masked_fill(~keep, -math.inf), dim=-1)
    cdf = probs.cumsum(-1)
    total = float(cdf[-1])
    x = u * total
    token = min(int(torch.searchsorted(cdf, torch.tensor([x], dtype=torch.float64), right=True)), len(z) - 1)
    lower = float(cdf[token - 1]) if token > 0 else 0.0
    edge = min(x - lower, float(cdf[token]) - x) / total
    # Flipped memberships move every CDF value by at most the mass they add or remove.
    full = torch.softmax(z, dim=-1)
    flipped = float(full[uncertain].sum() / full[keep].sum()) if bool(uncertain.any()) else 0.0
    return Redraw(token=token, edge=edge, slack=cdf_move + flipped + 1e-9)
