"""How a job is held against the oracle (tests/reference_hogwild.py); shared by tests/test_oracle.py and
``python -m bench oracle`` (bench/oracle_bench.py).

The oracle is a float64 copy of the model the engine was built from. Per compared row (every row whose
trace holds the engine's logits) the error is ``max |engine - oracle| / (max - min of the oracle's
logits)``: relative to the logits' spread, so that figures compare across models. A job's error is the
largest over its rows.

Tolerances:

* float32 engine: ``TOL_FLOAT32`` = 1e-5. float32 rounds at 2**-24 (6e-8) relative; over two layers, a
  64-wide hidden state and softmaxes over up to ~1400 keys the engine's error stays between 1.7e-7 and
  1.4e-6 in the 189 float32 cases of docs/BENCHMARKS.md, "Oracle" (transformers' own float32 error on the
  same traces is of the same size), so 1e-5 leaves 7x, while the wrong variants of ``WRONG_VARIANTS``
  land 900x to 12700x above it.
* bfloat16 engine: ``BF16_MULTIPLE`` = 4 times transformers' own bfloat16 error on the same trace (the
  bfloat16 model replayed through the same reference cache, measured against the same float64 oracle).
  Both round weights and activations to bfloat16 (8 bits of mantissa) and accumulate in float32, but at
  different points (fused ops, another summation order), so one row's two errors can differ by 6x while
  their means over a job stay within 0.9 to 1.5x of each other in the jobs looked at; the maximum over a
  job's rows, which the tolerance bounds, came out at 0.46 to 2.8 times transformers' over the 189
  bfloat16 cases of docs/BENCHMARKS.md, "Oracle". 4 leaves 1.4x over the worst ratio seen. It is too
  coarse to catch the wrong variants on every model (their errors, 1e-2 to 1e-1 of the spread on these
  tiny models, are often within a few bfloat16 errors: margins 0.24 to 3.6): the float32 runs of every
  backend are what catch those.

Tokens: a greedy row's token must be the oracle's argmax (after the job's logit bias and the row's bans)
unless the oracle's top two are closer than twice the row's measured error (a near tie). A sampled row's
token must be the oracle's own draw at the trace's uniform (``redraw``) unless the uniform lies within the
draw's slack of an interval end (``Redraw.near_boundary``), which must be rare.

Views: every row's view must list the blocks in the order the layout documents (``documented_view``,
written out here from docs/ARCHITECTURE.md, "The format", and the docstrings of engine/collab.py's
``Layout``; not computed by it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tests.reference_hogwild import CORRECT, Variant, biased_logits, float64_copy, redraw, replay

if TYPE_CHECKING:
    from engine.trace import TraceStep

TOL_FLOAT32 = 1e-5
BF16_MULTIPLE = 4.0
# Near-boundary draws allowed: at most this fraction of a job's draws (and at least one).
NEAR_BOUNDARY_SHARE = 0.02

# Worker names in index order, as the format documents them ("**Alice [1]:** ...").
WORKER_NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi")


# ---- the documented block order of every view ----------------------------------------------------------


def own_block(layout: str, worker: int) -> str:
    """A worker's block: ``step:<Name>`` where steps roll over into common, else ``out:<Name>``."""
    prefix = "step" if layout in ("combined", "interleaved") else "out"
    return f"{prefix}:{WORKER_NAMES[worker]}"


def static_blocks(layout: str, workers: int) -> list[str]:
    """The blocks prefilled once after the prompt, in order: the others' header (not in contiguous), one
    cut mark per worker, the own header (not in interleaved); none in plain."""
    if layout == "plain":
        return []
    head = [] if layout == "contiguous" else ["others_header"]
    own = [] if layout == "interleaved" else ["own_header"]
    return head + [f"cut:{k}" for k in range(1, workers + 1)] + own


def _with_cuts(blocks: list[str], last_cut: bool) -> list[str]:
    """Blocks one after another, the k-th followed by ``cut:k`` (the last one only with ``last_cut``)."""
    out: list[str] = []
    for k, block in enumerate(blocks, start=1):
        out += [block, f"cut:{k}"] if k < len(blocks) or last_cut else [block]
    return out


def documented_view(layout: str, workers: int, key: int, block: str) -> list[str]:
    """The view of a row in the order the layout documents, ending with the row's own block.

    ``key``: -1 for a prefill row (the prompt alone; a static block after the prompt and the others'
    header, where it is read), a worker's index, or -2 - k for the finisher writing ``finisher:k`` (it
    reads every worker's text, each ended by a cut mark, after the others' header; a plain sequence simply
    goes on)."""
    if key == -1:
        if block == "common":
            return ["common"]
        if block not in static_blocks(layout, workers):
            return ["<not a prefilled block>"]
        head = [] if layout == "contiguous" or block == "others_header" else ["others_header"]
        return ["common", *head, block]
    if key < -1:
        everyone = [own_block(layout, j) for j in range(workers)]
        if layout == "plain":
            return ["common", *everyone, f"finisher:{-2 - key}"]
        head = [] if layout == "contiguous" else ["others_header"]
        return ["common", *head, *_with_cuts(everyone, last_cut=True), f"finisher:{-2 - key}"]
    own = own_block(layout, key)
    others = [own_block(layout, j) for j in range(workers) if j != key]
    if layout == "combined":
        return ["common", "others_header", *_with_cuts(others, last_cut=False), "own_header", own]
    if layout == "contiguous":
        return ["common", *_with_cuts(others, last_cut=False), "own_header", own]
    return ["common", own]  # interleaved, plain


def view_problems(trace: list[TraceStep], layout: str, workers: int) -> list[str]:
    """Every row whose view (or block) differs from the documented one, and prefill out of order."""
    problems = []
    prefilled: list[str] = []
    for s, step in enumerate(trace):
        for row in step.rows:
            names = [name for name, _ in row.view]
            expected = documented_view(layout, workers, row.worker, row.block)
            if names != expected:
                problems.append(
                    f"step {s}, row {row.worker} ({row.block}): view {names}, documented {expected}"
                )
            if row.worker == -1 and (not prefilled or prefilled[-1] != row.block):
                prefilled.append(row.block)
    if prefilled and prefilled != ["common", *static_blocks(layout, workers)]:
        problems.append(f"prefilled {prefilled}, documented common then {static_blocks(layout, workers)}")
    return problems


# ---- the comparison ------------------------------------------------------------------------------------


def signature(trace: list[TraceStep]) -> tuple[Any, ...]:
    """What a replay depends on: each row's block, tokens and view, and the rollovers."""
    return tuple(
        (
            tuple((r.worker, r.block, tuple(r.tokens), tuple(r.view)) for r in step.rows),
            tuple((ro.block, ro.into, ro.length) for ro in step.rollovers),
        )
        for step in trace
    )


class Oracle:
    """A model (the one an engine was built from) and its float64 copy, with the last replays kept: the
    same trace from several backends is replayed once."""

    KEEP = 3  # a half-precision job: the oracle, transformers in the dtype, a wrong variant

    def __init__(self, model: Any) -> None:
        self.model = model
        self.exact = float64_copy(model)
        self._memo: dict[tuple[Any, ...], list[list[torch.Tensor | None]]] = {}

    def _replay(
        self, model: Any, trace: list[TraceStep], variant: Variant
    ) -> list[list[torch.Tensor | None]]:
        key = (id(model), variant, signature(trace))
        if key not in self._memo:
            while len(self._memo) >= self.KEEP:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = replay(model, trace, variant)
        return self._memo[key]

    def logits(self, trace: list[TraceStep], variant: Variant = CORRECT) -> list[list[torch.Tensor | None]]:
        """The float64 oracle's logits (of ``variant``)."""
        return self._replay(self.exact, trace, variant)

    def own_dtype_logits(self, trace: list[TraceStep]) -> list[list[torch.Tensor | None]]:
        """transformers' own forward in the model's dtype, through the same reference cache."""
        return self._replay(self.model, trace, CORRECT)


@dataclass
class Comparison:
    """One job against the oracle. Errors are max abs error over the oracle's logit spread."""

    dtype: str
    rows: int = 0  # rows compared (every row the engine sampled from)
    max_error: float = 0.0
    baseline: float | None = None  # transformers' own error in the model's dtype (not float32)
    tolerance: float = TOL_FLOAT32
    greedy: int = 0  # greedy rows (workers of greedy jobs, every finisher row)
    argmax_agree: int = 0  # ... whose token is the oracle's argmax
    near_ties: int = 0  # ... whose token is not, within twice the row's error of it
    draws: int = 0  # sampled rows
    draws_equal: int = 0  # ... whose token is the oracle's own draw
    near_boundary: int = 0  # ... whose uniform lies within the slack of an interval end
    problems: list[str] = field(default_factory=list)

    @property
    def margin(self) -> float:
        """Error over tolerance: above 1 is a failure (or, for a wrong variant, a detection)."""
        return self.max_error / self.tolerance

    def failures(self) -> list[str]:
        """Everything that fails the oracle: the problems, an error over the tolerance, and near-boundary
        draws that are not rare."""
        out = list(self.problems)
        if self.max_error > self.tolerance:
            out.append(f"max error {self.max_error:.3g} of the logit spread > tolerance {self.tolerance:.3g}")
        if self.near_boundary > max(1, NEAR_BOUNDARY_SHARE * self.draws):
            out.append(f"{self.near_boundary} of {self.draws} draws lie near a CDF boundary: not rare")
        return out


def _error(engine: torch.Tensor, oracle: torch.Tensor) -> tuple[float, float]:
    """(max abs error, logit spread) of the engine's logits against the oracle's."""
    diff = (engine.to(oracle.device, torch.float64) - oracle).abs().max()
    return float(diff), float(oracle.max() - oracle.min())


def compare(model: Any, job: Any, oracle: Oracle | None = None, variant: Variant = CORRECT) -> Comparison:
    """Hold ``job`` (run by an engine built from ``model``, with ``trace=True``) against the oracle, or
    against a wrong ``variant`` of it."""
    oracle = oracle or Oracle(model)
    trace: list[TraceStep] = job.trace
    params = job.sampling
    sampled_job = params.temperature > 0 and params.top_k != 1
    exact = oracle.logits(trace, variant)
    result = Comparison(dtype=str(model.dtype).removeprefix("torch."))
    result.problems += view_problems(trace, job.options.layout, job.options.workers)

    # transformers' own error in a half-precision dtype, always against the right oracle.
    own: list[list[torch.Tensor | None]] | None = None
    correct = exact if variant == CORRECT else oracle.logits(trace)
    if model.dtype not in (torch.float32, torch.float64):
        own = oracle.own_dtype_logits(trace)
        result.baseline = 0.0
    for s, (step, refs) in enumerate(zip(trace, exact, strict=True)):
        for r, (row, ref) in enumerate(zip(step.rows, refs, strict=True)):
            if row.logits is None:
                continue
            where = f"step {s}, row {row.worker} ({row.block})"
            if ref is None or row.next_token is None:
                result.problems.append(f"{where}: logits without a token, or a prefill row with logits")
                continue
            result.rows += 1
            abs_err, spread = _error(row.logits, ref)
            result.max_error = max(result.max_error, abs_err / spread)
            if own is not None:
                own_row, right = own[s][r], correct[s][r]
                assert own_row is not None and right is not None
                own_err, right_spread = _error(own_row, right)
                result.baseline = max(result.baseline or 0.0, own_err / right_spread)
            finisher = row.worker < -1
            if sampled_job and not finisher:
                if row.uniform is None or not 0 <= row.uniform < 1:
                    result.problems.append(f"{where}: a sampled row's uniform is {row.uniform}")
                    continue
                d = redraw(
                    ref,
                    row.uniform,
                    params.temperature,
                    params.top_p,
                    params.top_k,
                    params.logit_bias,
                    row.banned,
                    logit_error=abs_err,
                )
                result.draws += 1
                result.near_boundary += d.near_boundary
                if d.token == row.next_token:
                    result.draws_equal += 1
                elif not d.near_boundary:
                    result.problems.append(
                        f"{where}: drew {row.next_token}, the oracle draws {d.token} "
                        f"(u {row.uniform}, {d.edge:.3g} from an interval end, slack {d.slack:.3g})"
                    )
                continue
            if row.uniform is not None:
                result.problems.append(f"{where}: a greedy row has a uniform")
            z = biased_logits(ref, params.logit_bias, row.banned)
            top = int(z.argmax())
            result.greedy += 1
            if top == row.next_token:
                result.argmax_agree += 1
                continue
            gap = float(z[top] - z[row.next_token])
            # The engine adds the bias to float32 logits: one more rounding of the biased value.
            if gap <= 2 * abs_err + 2.0**-22 * float(z[top].abs()):
                result.near_ties += 1
            else:
                result.problems.append(
                    f"{where}: token {row.next_token} is {gap:.3g} below the oracle's argmax {top}"
                )
    if result.baseline is not None:
        result.tolerance = BF16_MULTIPLE * result.baseline
    return result
