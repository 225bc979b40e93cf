"""The engine: one paged pool, one model, and a decode loop that batches the workers of every job.

``step()`` is one iteration of continuous batching: admit queued jobs whose pages can be reserved, ask
every running job for its rows (prefill chunks within a per-step token budget, then one row per active
worker), run them through a single forward pass, sample, and let each job apply its rules.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.collab import GUARDED_TEXT, check_answer_pattern
from engine.errors import InvalidRequest, PromptTooLong, QueueFullError
from engine.job import Job
from engine.layers.backends import ATTENTION_BACKENDS, resolve_attention
from engine.layers.cpu_kernels import cpu_has_bf16_dot
from engine.model_runner import Row
from engine.models.llama import ModelShape
from engine.pages import PagePool
from engine.parallel import Followers, RankSetup, build_runner, check_devices, check_divides
from engine.prompts import BUILTIN, Preset, load_presets
from engine.protocol import EngineOptions, Event, JobOptions
from engine.sampling import SamplingParams, sample, sampling_defaults

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Submission:
    """A submission checked but not yet tokenized (``Engine.check``)."""

    prompt: str | list[dict[str, str]]
    options: JobOptions  # resolved: sampling filled in, the preset named
    sampling: SamplingParams


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, and on CPUs with native bfloat16 math (avx512_bf16 or AMX), where a decode
    step's matmuls cost about the same for 1 or 8 rows; float32 elsewhere, where bfloat16 is emulated."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16_dot() else torch.float32


class Engine:
    def __init__(self, hf_model: Any, tokenizer: Any, device: str | torch.device = "cpu", **options: Any):
        self.options = EngineOptions(**options)
        config = hf_model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model type {config.model_type!r} is not a supported Llama-family model")
        self.device = torch.device(device)
        self.dtype = hf_model.dtype
        self.tokenizer = tokenizer
        self.config = config
        state = hf_model.state_dict()
        whole = ModelShape.from_config(config, state)
        opts = self.options
        world = opts.tensor_parallel
        if world < 1:
            raise ValueError("tensor_parallel must be at least 1")
        check_divides(whole, world)
        check_devices(self.device, world)
        self.shape = whole.sharded(world)  # rank 0's share; vocab_size and positions are the model's
        opts.attention = resolve_attention(
            opts.attention, self.device, self.dtype, self.shape.head_dim, opts.cpu_kernels
        )
        if opts.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {sorted(ATTENTION_BACKENDS)}")
        self.pool = PagePool(self._num_pages(), opts.page_size, opts.prefix_cache)
        setup = RankSetup(
            config,
            state,
            whole,
            world,
            str(self.device),
            self.dtype,
            runner={
                "attention": opts.attention,
                "cuda_graphs": opts.cuda_graphs and self.device.type == "cuda",
                "fused_ops": opts.fused_ops,
            },
            num_pages=self.pool.num_pages,
            page_size=opts.page_size,
            cpu_kernels=opts.cpu_kernels,
            threads=torch.get_num_threads(),
        )
        self.followers = Followers(setup) if world > 1 else None
        try:
            self.runner = build_runner(setup, 0, self.pool, self.followers)
        except Exception as exc:
            if self.followers is not None:
                self.followers.built(f"rank 0: {type(exc).__name__}: {exc}")
            raise
        if self.followers is not None:
            self.followers.built(None)
        self.model = self.runner.model
        self.eos_ids = self._eos_ids(hf_model)
        self.default_sampling = sampling_defaults(hf_model)
        self.presets: dict[str, Preset] = {**BUILTIN, **(load_presets(opts.presets) if opts.presets else {})}
        tokens = [t or "" for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
        self.vocab = [t.lstrip("\u0120\u2581 ") for t in tokens]  # byte-level and sentencepiece spaces
        self.brackets = tuple(i for i, t in enumerate(self.vocab) if t.startswith("["))
        self.guards = self.token_ids_containing(GUARDED_TEXT) | {
            t for t in (tokenizer.bos_token_id, *self.eos_ids) if t is not None
        }
        self.jobs: dict[str, Job] = {}
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []
        self.outbox: list[Event] = []
        self.steps = 0

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        **options: Any,
    ) -> Engine:
        """Load a hub id, a local folder or a .gguf file; None loads the embedded default model."""
        from engine.loader import load_hf

        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        dtype = dtype or default_dtype(torch.device(device))
        hf_model, tokenizer = load_hf(model, dtype)
        return cls(hf_model, tokenizer, device=device, **options)

    @classmethod
    def from_hf(cls, model: Any, tokenizer: Any, **options: Any) -> Engine:
        """Serve an in-memory transformers model (its weights are copied)."""
        return cls(model, tokenizer, device=options.pop("device", model.device), **options)

    def _num_pages(self) -> int:
        opts = self.options
        if opts.num_pages:
            return opts.num_pages
        tokens = opts.kv_tokens
        if tokens is None:
            s = self.shape
            per_token = 2 * s.num_layers * s.num_kv_heads * s.head_dim * self.dtype.itemsize
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                tokens = int(free * 0.9) // per_token
            else:
                tokens = 32768
        return max(1, tokens // opts.page_size)

    def _eos_ids(self, hf_model: Any) -> set[int]:
        ids: set[int] = set()
        for source in (
            self.tokenizer.eos_token_id,
            getattr(hf_model.generation_config, "eos_token_id", None),
        ):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    # -- public API ---------------------------------------------------------------------------------

    @property
    def total_pages(self) -> int:
        return self.pool.num_pages

    @property
    def free_pages(self) -> int:
        """Pages no job holds or has reserved (evictable cached pages included)."""
        return self.pool.unreserved

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def token_ids_containing(self, texts: tuple[str, ...]) -> set[int]:
        return {i for i, t in enumerate(self.vocab) if any(x in t for x in texts)}

    def prompt_ids(
        self,
        prompt: str | list[dict[str, str]],
        workers: int,
        layout: str = "combined",
        preset: str = "none",
        tokenizer: Any = None,
    ) -> list[int]:
        """The chat-templated prompt: the preset's worked examples as earlier turns, its instructions
        before the first user turn. ``tokenizer``: a copy of the engine's, for another thread."""
        tok = tokenizer or self.tokenizer
        messages = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        )
        if not any(m.get("role") == "user" for m in messages):
            raise InvalidRequest("messages", "messages must contain a user message")
        messages = self.presets[preset].render(messages, workers, layout)
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        return list(tok.encode(text, add_special_tokens=False))

    def submit(self, prompt: str | list[dict[str, str]], job_id: str | None = None, **params: Any) -> Job:
        """Queue a job; ``params`` are the fields of ``JobOptions`` (engine/protocol.py). Raises
        InvalidRequest naming the field, PromptTooLong, or QueueFullError."""
        request = self.check(prompt, **params)
        return self.enqueue(request, self.tokenize(request), job_id)

    def check(self, prompt: str | list[dict[str, str]], **params: Any) -> Submission:
        """Everything about a submission that needs no tokenizing: its options, resolved."""
        options = JobOptions.parse(params)
        options.within(self.options.max_workers, self.options.max_tokens)
        multi = options.workers > 1 and options.layout != "plain"
        preset = options.instructions if options.instructions is not None else ("full" if multi else "none")
        if preset not in self.presets:
            raise InvalidRequest("instructions", f"instructions must be one of {', '.join(self.presets)}")
        rule = check_answer_pattern(options.answer_pattern)
        if any(not 0 <= t < self.shape.vocab_size for t, _ in options.logit_bias):
            raise InvalidRequest(
                "logit_bias", f"logit_bias token ids must be in [0, {self.shape.vocab_size})"
            )
        defaults = self.default_sampling
        sampling = SamplingParams(
            defaults.temperature if options.temperature is None else options.temperature,
            defaults.top_p if options.top_p is None else options.top_p,
            defaults.top_k if options.top_k is None else options.top_k,
            options.logit_bias,
            self._suppressed(multi if options.suppress is None else options.suppress),
            options.logprobs,
        )
        sampling.validate()
        if not prompt:
            field = "messages" if isinstance(prompt, list) else "prompt"
            raise InvalidRequest(field, f"{field} must not be empty")
        resolved = replace(
            options,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            instructions=preset,
            answer_pattern=rule,
        )
        return Submission(prompt, resolved, sampling)

    def tokenize(self, request: Submission, tokenizer: Any = None) -> list[int]:
        """The prompt's ids. Safe off the engine's thread with a tokenizer of its own (engine/serve.py
        tokenizes there, so that a long prompt does not hold up every job's step)."""
        o = request.options
        assert o.instructions is not None
        ids = self.prompt_ids(request.prompt, o.workers, o.layout, o.instructions, tokenizer)
        if len(ids) < 2:
            raise InvalidRequest("prompt", "prompt must be at least two tokens long")
        return ids

    def enqueue(self, request: Submission, ids: list[int], job_id: str | None = None) -> Job:
        """Queue a checked, tokenized submission, if its job fits the model and the pool."""
        options, sampling = request.options, request.sampling
        if len(self.queue) >= self.options.max_queued_jobs:
            raise QueueFullError(f"the queue is full ({self.options.max_queued_jobs} jobs waiting)")
        job = Job(
            job_id or f"job-{uuid.uuid4().hex[:12]}",
            ids,
            options,
            sampling,
            self.tokenizer,
            self.encode,
            self.eos_ids,
            self.device,
            self.brackets,
        )
        if job.id in self.jobs:
            raise InvalidRequest("id", f"job id {job.id!r} is already in use")
        if job.max_total_tokens > self.shape.max_positions:
            raise PromptTooLong(
                "prompt",
                f"prompt too long: {len(ids)} prompt tokens plus {options.workers} workers x up to "
                f"{job.token_cap} tokens exceed the model's {self.shape.max_positions} positions; "
                "shorten the prompt or lower max_tokens or workers",
            )
        pages = job.pages_needed(self.pool)
        if pages > self.pool.num_pages:
            raise PromptTooLong(
                "max_tokens",
                f"job needs {pages} KV pages but the pool has {self.pool.num_pages}; "
                "lower max_tokens or workers",
            )
        self.jobs[job.id] = job
        self.queue.append(job)
        return job

    def _suppressed(self, suppress: bool | tuple[str, ...]) -> tuple[int, ...]:
        """The ids a job never samples: the format guards for ``True``, tokens holding any of the
        strings of a list."""
        if isinstance(suppress, bool):
            return tuple(sorted(self.guards)) if suppress else ()
        return tuple(sorted(self.token_ids_containing(suppress)))

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; its pages are free when this returns."""
        job = self.jobs.get(job_id)
        if job is None or job.ended:
            return False
        if job in self.queue:
            self.queue.remove(job)
        self.outbox += job.cancel()
        self._retire(job)
        return True

    def generate(self, prompt: str | list[dict[str, str]], **kwargs: Any) -> Job:
        """Run one job to completion (other queued jobs advance too)."""
        job = self.submit(prompt, **kwargs)
        while not job.ended:
            self.step()
        return job

    @property
    def has_work(self) -> bool:
        return bool(self.queue or self.running or self.outbox)

    # -- the loop -----------------------------------------------------------------------------------

    def take_outbox(self) -> list[Event]:
        """Events made between steps (a cancel's done)."""
        events, self.outbox = self.outbox, []
        return events

    def step(self) -> list[Event]:
        events = self.take_outbox()
        self._admit()
        scheduled: list[tuple[Job, list[tuple[int, Row]]]] = []
        slots = []
        budget = self.options.prefill_chunk
        for job in list(self.running):
            try:  # a job's own failure (its rows, its pages) must not stop the others
                rows, budget = job.schedule(budget, self.pool)
                job_slots = [row.block.extend(self.pool, row.tokens, job.holder) for _, row in rows]
            except Exception as exc:
                events += self._fail(job, exc)
                continue
            if rows:
                scheduled.append((job, rows))
                slots += job_slots
        if not scheduled:
            return events
        logits = self.runner.run([row for _, rows in scheduled for _, row in rows], slots)
        # Logits come back in batch order: each job's rows that asked for them are one contiguous span,
        # cut into runs of rows that sample alike (a job's finisher rows are greedy).
        groups: list[tuple[slice, SamplingParams, torch.Generator | None]] = []
        row_bans: list[tuple[int, tuple[int, ...]]] = []
        spans, start = [], 0
        for job, rows in scheduled:
            keys = [key for key, row in rows if row.want_logits]
            for i, key in enumerate(keys, start):
                params, generator = job.sampling_for(key)
                if groups and groups[-1][0].stop == i and groups[-1][1:] == (params, generator) and i > start:
                    groups[-1] = (slice(groups[-1][0].start, i + 1), params, generator)
                else:
                    groups.append((slice(i, i + 1), params, generator))
                banned = job.row_bans(key)
                if banned:
                    row_bans.append((i, banned))
            spans.append(slice(start, start + len(keys)))
            start += len(keys)
        record = any(job.options.trace for job, _ in scheduled)
        tokens, uniforms, scores = sample(logits, groups, record, tuple(row_bans)) if start else ([], [], [])
        self.steps += 1
        for (job, rows), span in zip(scheduled, spans, strict=True):
            wanted = [key for key, row in rows if row.want_logits]
            picked = dict(zip(wanted, tokens[span], strict=True))
            scored = dict(zip(wanted, scores[span], strict=True)) if job.options.logprobs is not None else {}
            traced = None
            if job.options.trace:
                traced = dict(zip(wanted, zip(logits[span], uniforms[span], strict=True), strict=True))
            try:
                events += job.absorb(rows, picked, self.pool, traced, scored)
                for move in job.moves:  # the job decided; the cache is the engine's to change
                    self.runner.roll_over(job.blocks[move.block], job.blocks[move.into], job.holder)
                job.moves.clear()
            except Exception as exc:
                events += self._fail(job, exc)
            if job.ended:
                self._retire(job)
        return events

    def _fail(self, job: Job, exc: Exception) -> list[Event]:
        """End one job whose own rules or pages failed; the message names it, for the server's log."""
        log.exception("job %s failed", job.id)
        events = job.fail(f"job {job.id} failed: {type(exc).__name__}: {exc}")
        self._retire(job)
        return events

    def cancel_all(self) -> list[Event]:
        """Cancel every queued and running job (shutdown): each ends with its done event."""
        for job in [*self.queue, *self.running]:
            self.cancel(job.id)
        return self.take_outbox()

    def fail_running(self, message: str) -> list[Event]:
        """A forward pass failed: its jobs cannot go on, but their pages must come back."""
        events = []
        for job in list(self.running):
            events += job.fail(message)
            self._retire(job)
        return events

    def _admit(self) -> None:
        while self.queue and len(self.running) < self.options.max_running_jobs:
            job = self.queue[0]
            pages, cached = job.pages_needed(self.pool), job.cached_run(self.pool)
            if not self.pool.try_reserve(pages, cached):
                break
            self.queue.popleft()
            job.holder.reserved = pages
            job.status = "prefill"
            if self.pool.prefix_cache:
                self.pool.queries += len(job.prompt_pages.tokens)
            job.reuse(self.pool, cached)
            self.running.append(job)

    def _retire(self, job: Job) -> None:
        """An ended job leaves the engine: its events are sent, and the server keeps the record."""
        self.jobs.pop(job.id, None)
        if job in self.running:
            self.running.remove(job)
            job.release(self.pool)

    def lost(self) -> str | None:
        """Why this engine can step no more (a tensor-parallel rank is gone), or None."""
        return self.followers.lost() if self.followers is not None else None

    def close(self) -> None:
        """Stop the tensor-parallel ranks, if any (an engine of one rank holds nothing to stop)."""
        if self.followers is not None:
            self.followers.close()
            self.followers = None

    def stats(self) -> dict[str, Any]:
        pool = self.pool
        return {
            "running": len(self.running),
            "queued": len(self.queue),
            "total_pages": self.total_pages,
            "free_pages": self.free_pages,
            "used_pages": pool.num_pages - pool.free_list_len - pool.evictable,
            "evictable_pages": pool.evictable,
            "prefix_cache": pool.prefix_cache,
            "prefix_cache_queries": pool.queries,
            "prefix_cache_hits": pool.hits,
            "prefix_cache_hit_rate": pool.hits / pool.queries if pool.queries else 0.0,
            "prefix_cache_evictions": pool.evictions,
            "steps": self.steps,
            "graph_captures": self.runner.graphs.captures if self.runner.graphs else 0,
            "graph_replays": self.runner.graphs.replays if self.runner.graphs else 0,
        }
