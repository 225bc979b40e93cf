"""Tests of the reference Hogwild! (tests/reference_hogwild.py) itself, against plain transformers forwards.

Tiny random models, hand-written traces. Where a trace is equivalent to one flat sequence (every token's K/V
computed in the same context as in that sequence), the reference must equal the flat forward; where a block
was computed on its own (its author view holds only itself), its K/V are shift-equivariant, so the reference
must equal a flat forward with a block mask: this is what checks non-trivial re-rotation.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from transformers import (
    PreTrainedModel,
)

from engine.trace import Rollover, TraceRow, TraceStep
from tests.models import ALL_FAMILIES, random_model
from tests.reference_hogwild import (
    WRONG_VARIANTS,
    HogwildReferenceCache,
    Variant,
    float64_copy,
    float64_math,
    redraw,
    replay,
    rotary_of,
)

VOCAB = 128
TOL = 1e-4
TOL64 = 1e-9  # float64 replays against float64 flat forwards: the same math, rounded at 1e-16

_SMALL: dict[str, Any] = dict(
    max_position_embeddings=256,
    initializer_range=0.1,  # larger than the default 0.02: sharper, more position-sensitive attention
)


def make_model(
    family: str = "llama-gqa4", attn: str = "eager", seed: int = 0, dtype: str = "float32"
) -> PreTrainedModel:
    model = random_model(family, VOCAB, seed, **_SMALL)
    model.set_attn_implementation(attn)
    return float64_copy(model) if dtype == "float64" else model


def tol(model: PreTrainedModel) -> float:
    return TOL64 if model.dtype == torch.float64 else TOL


def rand_tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


@torch.no_grad()
def flat_logits(
    model: PreTrainedModel, tokens: list[int], allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [len, vocab] of one flat sequence, optionally with a custom [len, len] boolean mask; a
    float64 model runs with the reference's float64 RoPE and norms (as ``replay`` runs it)."""
    ids = torch.tensor([tokens])
    exact = model.dtype == torch.float64
    out = torch.float64 if exact else torch.float32
    with float64_math(model, rotary_of(model)) if exact else contextlib.nullcontext():
        if allowed is None:
            return model(input_ids=ids, use_cache=False).logits[0].to(out)
        mask = torch.zeros((1, 1, len(tokens), len(tokens)), dtype=model.dtype)
        mask.masked_fill_(~allowed[None, None], torch.finfo(model.dtype).min)
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].to(out)


class TraceBuilder:
    """Writes traces by hand: views are given as block names, lengths are filled in (same-step included)."""

    def __init__(self) -> None:
        self.lens: dict[str, int] = {}
        self.steps: list[TraceStep] = []

    def step(
        self,
        rows: list[tuple[int, str, list[int], list[str]]],
        rollovers: Sequence[tuple[str, str]] = (),
    ) -> int:
        """rows: (worker, block, tokens, view block names ending with block). Returns the step index."""
        after = dict(self.lens)
        for _, block, tokens, _ in rows:
            after[block] = after.get(block, 0) + len(tokens)
        trace_rows = [
            TraceRow(worker=w, block=b, tokens=list(t), view=[(n, after.get(n, 0)) for n in v])
            for w, b, t, v in rows
        ]
        ros = []
        for block, into in rollovers:
            length = after.get(block, 0)
            ros.append(Rollover(worker=0, block=block, into=into, length=length))
            after[into] = after.get(into, 0) + length
            after[block] = 0
        self.lens = after
        self.steps.append(TraceStep(rows=trace_rows, rollovers=ros))
        return len(self.steps) - 1


def max_diff(a: torch.Tensor | None, b: torch.Tensor) -> float:
    assert a is not None
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_single_block_equals_flat(attn: str) -> None:
    model = make_model("llama-gqa4", attn)
    toks = rand_tokens(18, seed=1)
    tb = TraceBuilder()
    tb.step([(-1, "common", toks[:10], ["common"])])
    for i in range(10, 18):
        tb.step([(0, "common", [toks[i]], ["common"])])
    res = replay(model, tb.steps)
    ref = flat_logits(model, toks)
    assert res[0] == [None]
    for s, i in enumerate(range(10, 18), start=1):
        logits = res[s][0]
        assert logits is not None and logits.shape == (VOCAB,) and logits.dtype == torch.float32
        assert max_diff(logits, ref[i]) <= TOL


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_rollover_equals_flat(family: str, dtype: str) -> None:
    """A worker's steps rolled into common, chunked prefill, multi-token rows: one flat sequence."""
    model = make_model(family, dtype=dtype)
    toks = rand_tokens(26, seed=2)
    seq: list[int] = []
    checks: list[tuple[int, int]] = []  # (step index, flat index of the row's last token)
    tb = TraceBuilder()

    def add(
        worker: int, block: str, tokens: list[int], view: list[str], roll: Sequence[tuple[str, str]] = ()
    ) -> None:
        s = tb.step([(worker, block, tokens, view)], roll)
        seq.extend(tokens)
        if worker >= 0:
            checks.append((s, len(seq) - 1))

    it = iter(toks)

    def take(n: int) -> list[int]:
        return [next(it) for _ in range(n)]

    add(-1, "common", take(5), ["common"])  # chunked prefill
    add(-1, "common", take(3), ["common"])
    view = ["common", "step:A"]
    add(0, "step:A", take(3), view)  # a step header: several tokens in one row
    for _ in range(3):
        add(0, "step:A", take(1), view)
    add(0, "step:A", take(1), view, [("step:A", "common")])
    add(0, "step:A", take(2), view)
    for _ in range(3):
        add(0, "step:A", take(1), view)
    add(0, "step:A", take(1), view, [("step:A", "common")])
    add(0, "step:A", take(4), view)
    add(0, "step:A", take(1), view)
    assert tb.lens["common"] == 8 + 7 + 6 and tb.lens["step:A"] == 5

    res = replay(model, tb.steps)
    ref = flat_logits(model, seq)
    for s, i in checks:
        assert max_diff(res[s][0], ref[i]) <= tol(model), (family, s, i)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_two_workers_sees_other_block(attn: str) -> None:
    """B writes first; then A, viewing [common, step:B, step:A], equals flat(common + B + A)."""
    model = make_model("llama-gqa4", attn)
    common, b_toks, a_toks = rand_tokens(8, 3), rand_tokens(6, 4), rand_tokens(5, 5)
    view_a, view_b = ["common", "step:B", "step:A"], ["common", "step:A", "step:B"]

    def run(b: list[int]) -> tuple[list[list[torch.Tensor | None]], list[int], list[int]]:
        tb = TraceBuilder()
        tb.step([(-1, "common", common, ["common"])])
        b_steps = [tb.step([(1, "step:B", b[:2], view_b)])]
        b_steps += [tb.step([(1, "step:B", [t], view_b)]) for t in b[2:]]
        a_steps = [tb.step([(0, "step:A", a_toks[:2], view_a)])]
        a_steps += [tb.step([(0, "step:A", [t], view_a)]) for t in a_toks[2:]]
        return replay(model, tb.steps), b_steps, a_steps

    res, b_steps, a_steps = run(b_toks)
    ref_b = flat_logits(model, common + b_toks)
    ref_a = flat_logits(model, common + b_toks + a_toks)
    for k, s in enumerate(b_steps):
        assert max_diff(res[s][0], ref_b[8 + 1 + k]) <= TOL
    for k, s in enumerate(a_steps):
        assert max_diff(res[s][0], ref_a[8 + 6 + 1 + k]) <= TOL

    # A really reads B's block: other tokens for B change A's logits.
    res2, _, _ = run(rand_tokens(6, 6))
    assert max(max_diff(res2[s][0], res[s][0]) for s in a_steps) > 1e-2  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("family", list(ALL_FAMILIES))
def test_nontrivial_rerotation_and_rollover(family: str, dtype: str) -> None:
    """B computed on its own (view [step:B]) at 0.., then read by A at offset 8 and rolled into common.

    B's K/V are shift-equivariant, so A must equal flat(common + B + A) where B does not see common. An
    independent worker D shares the steps (rows of different lengths: padding). A's own step is rolled over
    too, and A goes on after both rollovers.
    """
    model = make_model(family, dtype=dtype)
    eps = tol(model)
    common, b_toks, a_toks, d_toks = (
        rand_tokens(8, 7),
        rand_tokens(5, 8),
        rand_tokens(10, 9),
        rand_tokens(12, 10),
    )
    view_a = ["common", "step:B", "step:A"]
    tb = TraceBuilder()
    tb.step([(-1, "common", common, ["common"])])
    b_steps = [tb.step([(1, "step:B", b_toks[:3], ["step:B"])])]
    b_steps += [tb.step([(1, "step:B", [t], ["step:B"])]) for t in b_toks[3:]]
    a_chunks = [a_toks[:3], a_toks[3:4], a_toks[4:5], a_toks[5:7], a_toks[7:8], a_toks[8:9], a_toks[9:10]]
    d_chunks = [d_toks[:1], d_toks[1:5], d_toks[5:6], d_toks[6:7], d_toks[7:8], d_toks[8:11], d_toks[11:12]]
    rolls: dict[int, list[tuple[str, str]]] = {1: [("step:B", "common")], 4: [("step:A", "common")]}
    a_steps = [
        tb.step([(3, "step:D", d, ["step:D"]), (0, "step:A", a, view_a)], rolls.get(k, []))
        for k, (a, d) in enumerate(zip(a_chunks, d_chunks, strict=True))
    ]
    assert tb.lens == {"common": 8 + 5 + 8, "step:B": 0, "step:A": 2, "step:D": 12}

    res = replay(model, tb.steps)

    ref_b = flat_logits(model, b_toks)
    assert max_diff(res[b_steps[0]][0], ref_b[2]) <= eps
    for k, s in enumerate(b_steps[1:]):
        assert max_diff(res[s][0], ref_b[3 + k]) <= eps

    ref_d = flat_logits(model, d_toks)
    n = 0
    for s, d in zip(a_steps, d_chunks, strict=True):
        n += len(d)
        assert max_diff(res[s][0], ref_d[n - 1]) <= eps

    seq = common + b_toks + a_toks
    allowed = torch.ones(len(seq), len(seq)).tril().bool()
    allowed[8:13, :8] = False  # B did not see common
    ref_a = flat_logits(model, seq, allowed)
    n = 13
    for s, a in zip(a_steps, a_chunks, strict=True):
        n += len(a)
        assert max_diff(res[s][1], ref_a[n - 1]) <= eps, (family, s)


def test_rerotation_is_what_the_test_detects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutation check: without the re-rotation the previous scenario's expectations fail clearly."""
    model = make_model("llama-gqa4")
    common, b_toks, a_toks = rand_tokens(8, 7), rand_tokens(5, 8), rand_tokens(3, 9)
    tb = TraceBuilder()
    tb.step([(-1, "common", common, ["common"])])
    tb.step([(1, "step:B", b_toks, ["step:B"])])
    s = tb.step([(0, "step:A", a_toks, ["common", "step:B", "step:A"])])
    seq = common + b_toks + a_toks
    allowed = torch.ones(len(seq), len(seq)).tril().bool()
    allowed[8:13, :8] = False
    ref = flat_logits(model, seq, allowed)[-1]
    assert max_diff(replay(model, tb.steps)[s][0], ref) <= TOL
    monkeypatch.setattr(HogwildReferenceCache, "_rerotate", lambda self, keys, delta: keys)
    assert max_diff(replay(model, tb.steps)[s][0], ref) > 1e-2


def test_same_step_visibility() -> None:
    """A's token sees B's token written in the same step exactly as if B had written it a step earlier."""
    model = make_model("qwen3-qknorm")
    common, b_toks, a_toks = rand_tokens(8, 11), rand_tokens(4, 12), rand_tokens(3, 13)
    view_a, view_b = ["common", "step:B", "step:A"], ["common", "step:B"]

    def prefix() -> TraceBuilder:
        tb = TraceBuilder()
        tb.step([(-1, "common", common, ["common"])])
        tb.step([(1, "step:B", b_toks[:3], view_b)])
        return tb

    seq_tb = prefix()
    sb = seq_tb.step([(1, "step:B", b_toks[3:], view_b)])
    sa = seq_tb.step([(0, "step:A", a_toks, view_a)])
    seq = replay(model, seq_tb.steps)

    for order in ([0, 1], [1, 0]):
        rows = [(1, "step:B", b_toks[3:], view_b), (0, "step:A", a_toks, view_a)]
        same_tb = prefix()
        s = same_tb.step([rows[i] for i in order])
        same = replay(model, same_tb.steps)[s]
        assert max_diff(same[order.index(0)], seq[sb][0]) <= 1e-5  # type: ignore[arg-type]
        assert max_diff(same[order.index(1)], seq[sa][0]) <= 1e-5  # type: ignore[arg-type]

    ref = flat_logits(model, common + b_toks + a_toks)
    assert max_diff(seq[sa][0], ref[-1]) <= TOL


def test_eager_and_sdpa_agree() -> None:
    results = []
    for attn in ("eager", "sdpa"):
        model = make_model("qwen2-bias", attn)
        tb = TraceBuilder()
        tb.step([(-1, "common", rand_tokens(6, 14), ["common"])])
        for k in range(4):
            tb.step(
                [
                    (0, "step:A", rand_tokens(1 + (k == 0), 15 + k), ["common", "step:B", "step:A"]),
                    (1, "step:B", rand_tokens(1 + 2 * (k == 1), 25 + k), ["common", "step:A", "step:B"]),
                ],
                [("step:A", "common")] if k == 2 else [],
            )
        results.append(replay(model, tb.steps))
    for step_e, step_s in zip(*results, strict=True):
        for le, ls in zip(step_e, step_s, strict=True):
            assert (le is None) == (ls is None)
            if le is not None and ls is not None:
                assert max_diff(le, ls) <= 1e-5


def test_rejects_inconsistent_traces() -> None:
    model = make_model("llama-gqa4")
    ok = TraceRow(worker=-1, block="common", tokens=[1, 2, 3], view=[("common", 3)])
    bad_len = TraceRow(worker=0, block="step:A", tokens=[4], view=[("common", 2), ("step:A", 1)])
    with pytest.raises(ValueError, match="holds 3"):
        replay(model, [TraceStep(rows=[ok]), TraceStep(rows=[bad_len])])
    not_last = TraceRow(worker=0, block="step:A", tokens=[4], view=[("step:A", 1), ("common", 3)])
    with pytest.raises(ValueError, match="last entry"):
        replay(model, [TraceStep(rows=[ok]), TraceStep(rows=[not_last])])
    bad_roll = Rollover(worker=0, block="common", into="x", length=5)
    with pytest.raises(ValueError, match="rollover"):
        replay(model, [TraceStep(rows=[ok], rollovers=[bad_roll])])


def test_rejects_dynamic_rope() -> None:
    dynamic = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    model = random_model("llama-gqa4", VOCAB, rope_parameters=dynamic)
    with pytest.raises(ValueError, match="do not compose"):
        replay(
            model, [TraceStep(rows=[TraceRow(worker=-1, block="common", tokens=[1], view=[("common", 1)])])]
        )


# ---- float64 ----------------------------------------------------------------------------------------------


def test_float64_copy_and_its_math() -> None:
    """The oracle is a float64 copy (the model itself untouched) whose RoPE and norms run in float64 during a
    replay only: transformers' own float64 forward takes both in float32, 1e-8..1e-6 away."""
    model = make_model("qwen3-qknorm")  # q/k norms too
    exact = float64_copy(model)
    assert model.dtype == torch.float32 and exact.dtype == torch.float64
    assert exact.config._attn_implementation == "sdpa"
    toks = rand_tokens(40, seed=31)
    tb = TraceBuilder()
    tb.step([(-1, "common", toks[:30], ["common"])])
    steps = [tb.step([(0, "step:A", [t], ["common", "step:A"])]) for t in toks[30:]]
    res = replay(exact, tb.steps)
    assert all(
        type(m).forward is m.forward.__func__ for m in exact.modules() if hasattr(m.forward, "__func__")
    )
    ours = flat_logits(exact, toks)
    theirs = exact(input_ids=torch.tensor([toks]), use_cache=False).logits[0]
    for k, s in enumerate(steps):
        logits = res[s][0]
        assert logits is not None and logits.dtype == torch.float64
        assert max_diff(logits, ours[30 + k]) <= TOL64
    assert 1e-9 < max_diff(theirs[-1], ours[-1]) < 1e-4
    assert max_diff(replay(model, tb.steps)[steps[-1]][0], ours[-1]) < TOL  # float32 agrees to its own error


# ---- wrong variants -------------------------------------------------------------------------------------


def _two_writers() -> tuple[TraceBuilder, int]:
    """B writes a step on its own, then A (reading B) and D (reading only itself) step together with B."""
    common, b_toks, a_toks, d_toks = (
        rand_tokens(8, 41),
        rand_tokens(5, 42),
        rand_tokens(3, 43),
        rand_tokens(4, 44),
    )
    tb = TraceBuilder()
    tb.step([(-1, "common", common, ["common"])])
    tb.step([(1, "step:B", b_toks[:3], ["common", "step:B"])])
    s = tb.step(
        [
            (1, "step:B", b_toks[3:], ["common", "step:B"]),
            (0, "step:A", a_toks, ["common", "step:B", "step:A"]),
            (3, "step:D", d_toks, ["step:D"]),
        ]
    )
    return tb, s


def test_variants_change_only_what_they_break() -> None:
    """Each wrong variant moves the rows it should and no other: hiding same-step tokens changes only the
    row that reads another's block; block-local keys change only rows whose blocks sit past offset 0;
    applying YaRN's factor twice changes nothing without YaRN."""
    model = make_model("llama-gqa4")
    tb, s = _two_writers()
    right = replay(model, tb.steps)[s]
    hidden = replay(model, tb.steps, WRONG_VARIANTS["no same-step visibility"])[s]
    local = replay(model, tb.steps, WRONG_VARIANTS["keys at block-local positions"])[s]
    yarn_twice = replay(model, tb.steps, WRONG_VARIANTS["yarn factor applied twice"])[s]
    b, a, d = 0, 1, 2
    assert max_diff(hidden[b], right[b]) == 0 and max_diff(hidden[d], right[d]) == 0  # type: ignore[arg-type]
    assert max_diff(hidden[a], right[a]) > 1e-3  # type: ignore[arg-type]
    assert max_diff(local[d], right[d]) == 0  # type: ignore[arg-type]
    assert min(max_diff(local[r], right[r]) for r in (a, b)) > 1e-3  # type: ignore[arg-type]
    assert all(max_diff(yarn_twice[r], right[r]) == 0 for r in (a, b, d))  # type: ignore[arg-type]

    yarn = make_model("yarn-rope")
    right = replay(yarn, tb.steps)[s]
    twice = replay(yarn, tb.steps, Variant(yarn_twice=True))[s]
    assert min(max_diff(twice[r], right[r]) for r in (a, b, d)) > 1e-3  # type: ignore[arg-type]


# ---- sampling ---------------------------------------------------------------------------------------------


def _kept(probs: list[float], top_k: int, top_p: float) -> set[int]:
    """Top-k then top-p written out with a loop: the k largest (ties at the k-th kept), then the largest
    ones until their mass reaches top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if top_k:
        kth = probs[order[top_k - 1]]
        order = [i for i in order if probs[i] >= kth]
    total = sum(probs[i] for i in order)
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p * total:
            break
        kept.add(i)
        mass += probs[i]
    return kept


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.5, 4, 0.8)]
)
def test_redraw_draws_each_token_with_its_probability(temperature: float, top_k: int, top_p: float) -> None:
    """Over an even grid of uniforms every kept token is drawn in proportion to its filtered probability,
    no other token ever; bans and biases apply before the filters."""
    gen = torch.Generator().manual_seed(int(temperature * 10) + top_k)
    logits = torch.randn(12, generator=gen, dtype=torch.float64) * 2
    bias, banned = ((3, 1.5),), (int(logits.argmax()),)
    z = logits.clone()
    z[3] += 1.5
    z[banned[0]] = -math.inf
    probs = torch.softmax(z / temperature, dim=-1).tolist()
    kept = _kept(probs, top_k, top_p)
    total = sum(probs[i] for i in kept)
    n = 1000
    counts = [0] * 12
    for j in range(n):
        counts[redraw(logits, (j + 0.5) / n, temperature, top_p, top_k, bias, banned).token] += 1
    for i in range(12):
        expected = probs[i] / total if i in kept else 0.0
        assert abs(counts[i] / n - expected) <= 1.5 / n, (i, counts[i] / n, expected)


def test_redraw_flags_draws_near_a_boundary() -> None:
    """A uniform on an interval end is near a boundary; one in the middle of a wide interval is not, until
    the logit error is large enough to move that end."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    first_end = float(probs[0])
    on_edge = redraw(logits, first_end, 1.0, logit_error=1e-6)
    assert on_edge.near_boundary and on_edge.edge < 1e-12
    middle = redraw(logits, first_end / 2, 1.0, logit_error=1e-6)
    assert middle.token == 0 and not middle.near_boundary
    assert redraw(logits, first_end / 2, 1.0, logit_error=1.0).near_boundary
    # The top-p cut sits exactly at a token: its membership is uncertain, and so is every interval end.
    cut = float(probs[:2].sum())
    assert redraw(logits, first_end / 2, 1.0, top_p=cut, logit_error=1e-6).slack > float(probs[2]) / 2


def test_redraw_slack_counts_only_memberships_an_error_can_flip() -> None:
    """Top-k: the k-th token's membership is certain unless the next one is within twice the error."""
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    assert redraw(logits, 0.1, 1.0, top_k=2, logit_error=1e-6).slack < 1e-5
    close = torch.tensor([3.0, 2.0, 2.0 - 1e-7, 0.0, -1.0], dtype=torch.float64)
    assert redraw(close, 0.1, 1.0, top_k=2, logit_error=1e-6).slack > 0.1
