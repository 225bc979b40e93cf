"""A job's state: its blocks, its workers, the text they write and the rules that move it along.

The engine asks a job for its rows each step (``schedule``), runs them with every other job's rows, and
hands back one sampled token per row that asked for logits (``absorb``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.block_manager import Block, PageHolder, PagePool
from engine.collab import (
    ANSWER_PREFIX,
    FINISHER,
    QUICK_CHECK,
    Layout,
    ends_step,
    find_answer,
    opener,
    step_header,
    worker_name,
)
from engine.events import Event
from engine.model_runner import Row
from engine.sampling import SamplingParams
from engine.trace import Rollover, TraceRow, TraceStep


class Detokenizer:
    """Incremental decoding that never emits half a multi-byte character."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset :])
        if full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return full[len(prefix) :]


@dataclass
class JobOptions:
    workers: int = 2
    layout: str = "combined"
    max_tokens: int = 512
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    quick_check_every: int = 1024
    finisher: bool = True
    finisher_tokens: int = 16
    stop: tuple[str, ...] = ()
    trace: bool = False


@dataclass
class Worker:
    index: int
    name: str
    block: Block
    detok: Detokenizer
    text: str = ""
    step_text: str = ""
    step: int = 1
    generated: int = 0
    written: int = 0
    pending: list[int] = field(default_factory=list)  # next input tokens
    rollover_after: bool = False  # the pending token ends the step: roll over once it is written
    finisher_start: int = -1  # where the finisher's text starts in ``text``, once it runs
    done: bool = False
    finish_reason: str | None = None


class Job:
    def __init__(
        self,
        job_id: str,
        prompt_ids: list[int],
        options: JobOptions,
        tokenizer: Any,
        encode: Any,
        eos_ids: set[int],
        device: torch.device,
    ):
        self.id = job_id
        self.options = options
        self.layout = Layout(options.layout)
        self.tokenizer, self.encode, self.eos_ids = tokenizer, encode, eos_ids
        self.prompt_ids = prompt_ids
        self.status = "queued"
        self.answer: str | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.history: list[dict[str, Any]] = []
        self.trace: list[TraceStep] = []
        self.holder = PageHolder()
        self.seq = 0
        self.since_check = 0
        self.check_pending = False
        self.finishing = False
        self.finisher_generated = 0
        self.created = time.time()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.generator: torch.Generator | None = None
        if not options.sampling.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(
                options.seed if options.seed is not None else int(torch.randint(2**62, ()).item())
            )
        self.blocks: dict[str, Block] = {"common": Block("common")}
        self.prefill: list[tuple[str, list[int]]] = [("common", list(prompt_ids))]
        for name, text in self.layout.static_blocks():
            self.blocks[name] = Block(name)
            self.prefill.append((name, encode(text)))
        self.workers: list[Worker] = []
        for i in range(options.workers):
            block = Block(self.layout.worker_block(i))
            self.blocks[block.name] = block
            self.workers.append(Worker(i, worker_name(i), block, Detokenizer(tokenizer)))
        self.finisher_ids = encode(FINISHER)
        self.token_cap = options.max_tokens + options.max_tokens // 4 + 64
        # Every token lives in exactly one block, so this bounds both any view and what the job holds.
        self.max_total_tokens = (
            sum(len(ids) for _, ids in self.prefill)
            + options.workers * self.token_cap
            + len(self.finisher_ids)
            + options.finisher_tokens
        )

    # -- memory -------------------------------------------------------------------------------------

    def pages_needed(self, pool: PagePool) -> int:
        """Worst case: every token exists once (a step's pages are returned page by page as it moves into
        common), plus a partial page per block and one spare for the move."""
        return pool.pages_for(self.max_total_tokens) + len(self.blocks) + 2

    def release(self, pool: PagePool) -> None:
        for block in self.blocks.values():
            block.release(pool, self.holder)
        pool.release(self.holder.reserved)
        self.holder.reserved = 0

    # -- events -------------------------------------------------------------------------------------

    def event(self, type: str, **fields: Any) -> Event:
        ev = Event(type, self.id, self.seq, **fields)
        self.seq += 1
        return ev

    def view_names(self, worker: int) -> list[str]:
        return self.layout.view(worker, self.options.workers)

    def view(self, worker: int) -> list[tuple[str, list[int]]]:
        return [(name, list(self.blocks[name].tokens)) for name in self.view_names(worker)]

    @property
    def transcript(self) -> dict[str, Any]:
        return {"workers": {w.name: w.text for w in self.workers}, "history": list(self.history)}

    @property
    def usage(self) -> dict[str, int]:
        generated = sum(w.generated for w in self.workers)
        return {
            "prompt_tokens": len(self.prompt_ids),
            "completion_tokens": generated,
            "forced_tokens": sum(w.written for w in self.workers) - generated,
            "total_tokens": len(self.prompt_ids) + generated,
        }

    # -- scheduling ---------------------------------------------------------------------------------

    def schedule(self, prefill_budget: int) -> tuple[list[tuple[int, Row]], int]:
        """This step's rows as (worker index or -1 for prefill, row), and what is left of the budget."""
        if self.prefill:
            name, ids = self.prefill[0]
            take = len(ids) if name != "common" else min(len(ids), max(prefill_budget, 1))
            if name == "common" and prefill_budget <= 0:
                return [], prefill_budget
            self.prefill[0] = (name, ids[take:])
            if not self.prefill[0][1]:
                self.prefill.pop(0)
            block = self.blocks[name]
            view = [self.blocks[n] for n in self._prefill_view(name)]
            return [(-1, Row(ids[:take], block, view, want_logits=False))], prefill_budget - take
        rows = []
        for w in self.workers:
            if w.done or not w.pending:
                continue
            view = [self.blocks[n] for n in self.view_names(w.index)]
            rows.append((w.index, Row(list(w.pending), w.block, view, want_logits=not w.rollover_after)))
        return rows, prefill_budget

    def _prefill_view(self, name: str) -> list[str]:
        order = ["common"] + [n for n, _ in self.layout.static_blocks()]
        return order[: order.index(name) + 1]

    def begin_decode(self) -> list[Event]:
        """After prefill: every worker's first input is its opener."""
        self.status = "running"
        events = []
        for w in self.workers:
            events += self._force(w, self.encode(opener(w.index, self.options.workers)))
        return events

    def _force(self, w: Worker, ids: list[int]) -> list[Event]:
        """Make ``ids`` the worker's next input, or end it with ``length`` if they would pass its cap:
        forced text counts against the reservation exactly as sampled text does."""
        if not self._fits(w, len(ids)):
            return self._stop_worker(w, "length")
        w.pending = list(ids)
        return [self._token_event(w, t, forced=True) for t in ids]

    def _fits(self, w: Worker, tokens: int) -> bool:
        """Whether the worker may write ``tokens`` more: the cap that ``max_total_tokens`` is built on. The
        finisher writes on top of it, within its own allowance."""
        cap = self.token_cap + (
            len(self.finisher_ids) + self.options.finisher_tokens if self.finishing else 0
        )
        return w.written + tokens <= cap

    def _token_event(self, w: Worker, token: int, forced: bool) -> Event:
        piece = w.detok.push(token)
        w.text += piece
        w.step_text += piece
        return self.event(
            "token", worker=w.index, token_id=token, text=piece, forced=forced, data={"step": w.step}
        )

    # -- after the forward pass ---------------------------------------------------------------------

    def record(self, rows: list[tuple[int, Row]]) -> TraceStep | None:
        if not self.options.trace:
            return None
        step = TraceStep(
            [
                TraceRow(worker, row.block.name, list(row.tokens), [(b.name, len(b)) for b in row.view])
                for worker, row in rows
            ]
        )
        self.trace.append(step)
        return step

    def absorb(
        self,
        rows: list[tuple[int, Row]],
        sampled: dict[int, int],
        runner: Any,
        pool: PagePool,
        traced: dict[int, tuple[torch.Tensor, float | None]] | None = None,
    ) -> list[Event]:
        """Take this step's sampled tokens (by worker), apply text rules, rollovers and finishing.
        ``traced`` gives each sampled worker's logits and uniform draw, for the trace."""
        trace = self.record(rows)
        events: list[Event] = []
        if self.status == "prefill":
            if not self.prefill:
                events += self.begin_decode()
            return events
        for i, (worker, row) in enumerate(rows):
            w = self.workers[worker]
            w.written += len(row.tokens)
            w.pending = []
            if trace is not None and traced and worker in traced:  # trace rows are in ``rows`` order
                row_trace = trace.rows[i]
                row_trace.logits, row_trace.uniform = traced[worker]
                row_trace.next_token = sampled[worker]
            if w.rollover_after:
                w.rollover_after = False
                events += self._rollover(w, runner, pool, trace)
                continue
            if worker in sampled:
                events += self._accept(w, sampled[worker])
        if self.status == "running" and self.answer is None and all(w.done for w in self.workers):
            events += self._finish_or_finisher()
        elif self.answer is not None and self.status == "running":
            events += self._done("answer")
        return events

    def _accept(self, w: Worker, token: int) -> list[Event]:
        if self.first_token_at is None:
            self.first_token_at = time.time()
        if self.finishing:
            return self._accept_finisher(w, token)
        w.generated += 1
        self.since_check += 1
        if token in self.eos_ids:
            return self._stop_worker(w, "stop")
        events = [self._token_event(w, token, forced=False)]
        piece = events[0].text
        answer = find_answer(w.text)
        if answer is not None:
            self.answer = answer
            return events
        if any(s in w.text for s in self.options.stop):
            return events + self._stop_worker(w, "stop")
        if w.generated >= self.options.max_tokens or not self._fits(w, 1):
            return events + self._stop_worker(w, "length")
        w.pending = [token]
        if self.layout.rolls_over and ends_step(w.step_text, piece):
            w.rollover_after = True
        if self.options.quick_check_every and self.since_check >= self.options.quick_check_every:
            self.check_pending = True
        return events

    def _stop_worker(self, w: Worker, reason: str) -> list[Event]:
        w.done, w.finish_reason, w.pending = True, reason, []
        return []

    def _rollover(self, w: Worker, runner: Any, pool: PagePool, trace: TraceStep | None) -> list[Event]:
        """Move the finished step into common, page by page, re-rotating its keys once."""
        common, step = self.blocks["common"], w.block
        length = len(step)
        for i in range(0, length, pool.page_size):
            ids = step.tokens[i : i + pool.page_size]
            src = step.slots(pool, i, i + len(ids))
            shift = len(common) - i
            dst = common.extend(pool, ids, self.holder)
            runner.move(src, dst, shift)
            self.holder.give_back(pool, [step.pages[i // pool.page_size]])
        step.tokens, step.pages, step._slots = [], [], None  # its pages went back one by one above
        if trace is not None:
            trace.rollovers.append(Rollover(w.index, step.name, "common", length))
        self.history.append({"worker": w.index, "name": w.name, "step": w.step, "text": w.step_text})
        events = [self.event("step", worker=w.index, text=w.step_text, data={"step": w.step})]
        w.step += 1
        w.step_text = ""
        header = self.encode(step_header(w.index, w.step))
        if self.check_pending:
            self.check_pending, self.since_check = False, 0
            events.append(self.event("quick_check", worker=w.index, data={"step": w.step}))
            header += self.encode(QUICK_CHECK)
        return events + self._force(w, header)

    def _finish_or_finisher(self) -> list[Event]:
        reasons = {w.finish_reason for w in self.workers}
        reason = "length" if "length" in reasons else "stop"
        if not self.options.finisher:
            return self._done(reason)
        self.finishing, self.finish_reason = True, reason
        w = self.workers[0]
        w.done, w.rollover_after = False, False
        events = self._force(w, self.finisher_ids)
        w.finisher_start = len(w.text) - len(ANSWER_PREFIX)
        return events

    def _accept_finisher(self, w: Worker, token: int) -> list[Event]:
        events = [] if token in self.eos_ids else [self._token_event(w, token, forced=False)]
        w.generated += 1
        self.finisher_generated += 1
        tail = w.text[w.finisher_start :]
        answer = find_answer(tail)
        if (
            answer is not None
            or token in self.eos_ids
            or self.finisher_generated >= self.options.finisher_tokens
        ):
            # An unclosed box still holds the best guess we have.
            self.answer = answer if answer is not None else tail[len(ANSWER_PREFIX) :].strip() or None
            return events + self._done(self.finish_reason or "length")
        w.pending = [token]
        return events

    def _done(self, reason: str) -> list[Event]:
        self.status = "finished"
        self.finish_reason = reason
        self.finished_at = time.time()
        for w in self.workers:
            w.done, w.pending = True, []
        events = []
        if self.answer is not None:
            events.append(self.event("final", text=self.answer))
        events.append(self.event("done", data={"finish_reason": reason, "usage": self.usage}))
        return events

    def cancel(self) -> list[Event]:
        if self.status in ("finished", "cancelled", "failed"):
            return []
        events = self._done("cancelled")
        self.status = "cancelled"
        return events

    def fail(self, message: str) -> list[Event]:
        self.status, self.error, self.finish_reason = "failed", message, "error"
        self.finished_at = time.time()
        for w in self.workers:
            w.done, w.pending = True, []
        return [
            self.event("error", text=message),
            self.event("done", data={"finish_reason": "error", "usage": self.usage}),
        ]

    @property
    def ended(self) -> bool:
        return self.status in ("finished", "cancelled", "failed")
