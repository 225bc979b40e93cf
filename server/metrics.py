"""Prometheus metrics. Each app gets its own registry, so several apps (tests) can live in one process.

Latencies are measured where the server sees tokens arrive: time to first token from job creation,
inter-token latency between a worker's consecutive sampled tokens, and the engine's own step time. What one
engine has (its pool, jobs, steps, prefix cache) carries an ``engine`` label: "0", or "0" to "N-1" with
several engines; what jobs have (tokens, latencies, finish reasons) is counted over all of them.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


ENGINE = ("engine",)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        e = ENGINE
        self.engine_up = Gauge("hogwild_engine_up", "1 while the engine process is alive", e, registry=r)
        # One series with the model's name as a label, to join on (model_name, as vLLM labels it).
        self.model = Info("hogwild_model", "the model the engine serves", registry=r)
        self.restarts = Counter("hogwild_engine_restarts", "engines restarted after dying", registry=r)
        self.jobs_running = Gauge("hogwild_jobs_running", "jobs being decoded", e, registry=r)
        self.jobs_queued = Gauge("hogwild_jobs_queued", "jobs waiting for pages", e, registry=r)
        self.pages_total = Gauge("hogwild_pool_pages_total", "pages in the KV pool", e, registry=r)
        self.pages_used = Gauge("hogwild_pool_pages_used", "pages holding tokens", e, registry=r)
        self.pages_reserved = Gauge(
            "hogwild_pool_pages_reserved", "pages held or reserved by admitted jobs", e, registry=r
        )
        self.kv_usage = Gauge(
            "hogwild_kv_cache_usage_ratio", "share of the KV pool's pages holding tokens (0-1)", e, registry=r
        )
        self.pages_evictable = Gauge(
            "hogwild_pool_pages_evictable",
            "cached prompt pages no job holds: free for admission, evicted least recently used",
            e,
            registry=r,
        )
        self.cache_queries = Counter(
            "hogwild_prefix_cache_queries", "prompt tokens looked up in the prefix cache", e, registry=r
        )
        self.cache_hits = Counter(
            "hogwild_prefix_cache_hits", "prompt tokens read from the prefix cache", e, registry=r
        )
        self._seen: dict[tuple[str, str], int] = {}  # each engine's running totals as last read
        self.steps_per_second = Gauge(
            "hogwild_engine_steps_per_second", "recent decode steps/s", e, registry=r
        )
        self.graph_replays = Gauge(
            "hogwild_engine_graph_replays",
            "steps replayed from CUDA graphs since the engine started",
            e,
            registry=r,
        )
        self.graph_captures = Gauge(
            "hogwild_engine_graph_captures", "CUDA graphs captured since the engine started", e, registry=r
        )
        self.jobs = Counter("hogwild_jobs", "jobs ended, by finish reason", ["finish_reason"], registry=r)
        self.rejected = Counter(
            "hogwild_jobs_rejected", "submissions refused, by reason", ["reason"], registry=r
        )
        self.tokens = Counter("hogwild_tokens_generated", "tokens sampled by workers", registry=r)
        self.forced = Counter("hogwild_tokens_forced", "tokens written for workers", registry=r)
        self.prompt_tokens = Counter("hogwild_prompt_tokens", "prompt tokens of jobs admitted", registry=r)
        self.e2e = Histogram(
            "hogwild_e2e_job_latency_seconds",
            "job creation to its done event, however it ended",
            registry=r,
            buckets=JOB_BUCKETS,
        )
        self.queue_time = Histogram(
            "hogwild_job_queue_time_seconds",
            "job creation to its first event (waiting for pages and for its turn)",
            registry=r,
            buckets=JOB_BUCKETS,
        )
        self.ttft = Histogram(
            "hogwild_time_to_first_token_seconds",
            "job creation to first sampled token",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "hogwild_inter_token_latency_seconds",
            "gap between a worker's sampled tokens",
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.step = Histogram(
            "hogwild_step_latency_seconds", "one engine decode step", e, registry=r, buckets=LATENCY_BUCKETS
        )

    def engine_stats(self, stats: dict[str, Any], engine: str = "0") -> None:
        """One engine's counters, as its ``stats`` command answers them."""
        self.jobs_running.labels(engine).set(stats["running"])
        self.jobs_queued.labels(engine).set(stats["queued"])
        self.pages_total.labels(engine).set(stats["total_pages"])
        self.pages_used.labels(engine).set(stats["used_pages"])
        self.kv_usage.labels(engine).set(stats["used_pages"] / max(1, stats["total_pages"]))
        self.pages_reserved.labels(engine).set(stats["total_pages"] - stats["free_pages"])
        self.steps_per_second.labels(engine).set(stats["steps_per_second"])
        self.graph_replays.labels(engine).set(stats["graph_replays"])
        self.graph_captures.labels(engine).set(stats["graph_captures"])
        self.pages_evictable.labels(engine).set(stats["evictable_pages"])
        self._count(self.cache_queries, engine, "prefix_cache_queries", stats)
        self._count(self.cache_hits, engine, "prefix_cache_hits", stats)

    def _count(self, counter: Counter, engine: str, key: str, stats: dict[str, Any]) -> None:
        """Advance a counter by what the engine's running total grew since the last read; an engine
        restarted after dying counts from zero again."""
        total, seen = int(stats[key]), self._seen.get((engine, key), 0)
        counter.labels(engine).inc(total - seen if total >= seen else total)
        self._seen[(engine, key)] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
