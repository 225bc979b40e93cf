"""The prefix cache: full prompt pages computed by one job are read by later jobs with the same prefix.

A cached prefix must not change what a job computes (its logits against the cache off, and against the
transformers oracle, which recomputes the reused pages), jobs share exactly the full pages their prompts
have in common, idle cached pages give way to a job that needs the room, and every mix of jobs, cancels
included, leaves the pool whole: free + evictable == total.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import Engine
from engine.job import Job
from tests.oracle_cases import Oracle, compare
from tests.test_oracle import BACKENDS
from tests.test_reservation import check_reservations

JOB: dict[str, Any] = dict(max_tokens=16, quick_check_every=6, instructions="short", trace=True)


def make_engine(tok: Any, model: Any, **options: Any) -> Engine:
    options.setdefault("page_size", 4)
    options.setdefault("num_pages", 4096)
    options.setdefault("prefill_chunk", 96)
    return Engine.from_hf(model, tok, **options)


def run(eng: Engine, jobs: list[Job]) -> None:
    steps = 0
    while not all(j.ended for j in jobs):
        eng.step()
        check_reservations(eng)
        steps += 1
        assert steps < 3000, "the jobs never ended"
    assert all(j.status == "finished" for j in jobs), [j.error for j in jobs]


def sampled_logits(job: Job) -> list[torch.Tensor]:
    return [r.logits for step in job.trace for r in step.rows if r.logits is not None]


def computed_prompt_tokens(job: Job) -> int:
    return sum(len(r.tokens) for s in job.trace for r in s.rows if r.block == "common" and r.worker == -1)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture(scope="module")
def model(tok: Any) -> Any:
    from tests.models import tiny_model

    return tiny_model("qwen3-qknorm", tok)


@pytest.mark.parametrize("attention", BACKENDS)
@pytest.mark.parametrize(("layout", "workers"), [("combined", 3), ("contiguous", 2), ("plain", 1)])
def test_a_cached_prefix_gives_the_logits_of_the_cache_off(
    tok: Any, model: Any, attention: str, layout: str, workers: int
) -> None:
    """The second job reads its prompt's pages from the first; its logits are those of the same job with
    the cache off, and the oracle, recomputing the reused pages, agrees with every row."""
    job = dict(JOB, workers=workers, layout=layout)
    eng = make_engine(tok, model, attention=attention)
    first = eng.generate("Add 2 and 3.", **job)
    second = eng.generate("Add 2 and 3.", **job)
    off = make_engine(tok, model, attention=attention, prefix_cache=False).generate("Add 2 and 3.", **job)

    prompt = len(second.prompt_ids) - second.held_back
    usable = (prompt - 1) // eng.pool.page_size * eng.pool.page_size
    assert first.cached_tokens == 0 and off.cached_tokens == 0
    assert second.cached_tokens == usable > 0 and second.usage["cached_tokens"] == usable
    assert second.blocks["common"].tokens[:usable] == first.blocks["common"].tokens[:usable]
    reused = [r for s in second.trace for r in s.rows if r.reused]
    assert [len(r.tokens) for r in reused] == [usable]
    assert computed_prompt_tokens(second) == prompt  # the reference computes the reused row too
    # The first job computed its prompt in chunks of 96 tokens, the second one computes only its tail:
    # the same K/V up to float32 rounding, so the same tokens and logits within it.
    assert [w.text for w in second.workers] == [w.text for w in off.workers]
    for mine, theirs in zip(sampled_logits(second), sampled_logits(off), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5 * float(theirs.max() - theirs.min()))
    result = compare(model, second, Oracle(model))
    assert not result.failures(), "\n".join(result.failures()[:12])
    assert eng.pool.whole and eng.pool.evictable > 0


def test_jobs_share_exactly_the_full_pages_their_prompts_have_in_common(tok: Any, model: Any) -> None:
    eng = make_engine(tok, model, page_size=8)
    opts = dict(JOB, workers=2, trace=False)
    question = "A train leaves Ashford at six and runs at sixty kilometres an hour towards Brill, which "
    first = eng.generate(question + "lies 12 kilometres away. When does it arrive?", **opts)
    second = eng.generate(question + "is 18 kilometres further. How long does it take?", **opts)
    size = eng.pool.page_size
    shared = common_prefix(first.prompt_ids, second.prompt_ids) // size
    assert shared >= 4 and len(second.prompt_ids) // size > shared + 2
    assert first.prompt_pages.published == len(first.prompt_ids) // size  # every full prompt page was offered
    assert second.cached_tokens == shared * size
    assert eng.pool.hits == shared * size
    assert eng.pool.queries == len(first.prompt_ids) + len(second.prompt_ids)
    assert eng.pool.whole


def test_shared_pages_are_the_same_pages_while_both_jobs_run(tok: Any, model: Any) -> None:
    eng = make_engine(tok, model, page_size=8)
    opts = dict(JOB, workers=2, trace=False, max_tokens=40)
    first = eng.submit("Add 2 and 3, then multiply the sum by 7.", **opts)
    while first.status != "running":
        eng.step()
    second = eng.submit("Add 2 and 3, then divide the sum by 5.", **opts)
    while second.status != "running":
        eng.step()
    size = eng.pool.page_size
    shared = common_prefix(first.prompt_ids, second.prompt_ids) // size
    a, b = first.blocks["common"].pages, second.blocks["common"].pages
    assert shared > 0 and a[:shared] == b[:shared]
    assert not set(a[shared:]) & set(b[shared:])  # from the first differing page on, each its own
    # It read the first's pages and offered its own full prompt pages: all of them are pinned, and in no
    # job's reservation any more.
    assert second.prompt_pages.published == len(second.prompt_ids) // size > shared
    assert second.holder.shared == set(b[: second.prompt_pages.published])
    assert second.holder.reserved == second.pages_needed(eng.pool) - second.prompt_pages.published
    check_reservations(eng)
    run(eng, [first, second])
    assert eng.pool.whole and eng.pool.evictable >= len(first.prompt_pages.keys(eng.pool))


def test_jobs_submitted_together_compute_a_shared_prefix_once(tok: Any, model: Any) -> None:
    """The first job computes the prefix; the others wait for its pages instead of computing them too."""
    eng = make_engine(tok, model, prefill_chunk=64)
    jobs = [eng.submit(f"Job {i}: add 2 and 3.", **dict(JOB, workers=2)) for i in range(4)]
    run(eng, jobs)
    size = eng.pool.page_size
    shared = common_prefix(jobs[0].prompt_ids, jobs[1].prompt_ids) // size * size
    assert shared > 128  # longer than a chunk: the others wait over several steps
    assert jobs[0].cached_tokens == 0
    for job in jobs[1:]:
        assert job.cached_tokens == shared
        assert computed_prompt_tokens(job) - job.cached_tokens == len(job.prompt_ids) - shared
    assert eng.pool.whole


def test_a_waiting_job_computes_itself_when_the_computing_one_is_cancelled(tok: Any, model: Any) -> None:
    eng = make_engine(tok, model, prefill_chunk=30)
    first, second = (eng.submit("Add 2 and 3.", **dict(JOB, workers=2)) for _ in range(2))
    eng.step()
    # 30 tokens: seven full pages published, the eighth claimed by the first job while it computes it.
    keys = first.prompt_pages.keys(eng.pool)
    assert first.prompt_pages.published == 7 and eng.pool.computing(keys[7]) == first.id
    eng.cancel(first.id)
    run(eng, [second])
    assert second.cached_tokens == 28
    assert eng.pool.whole


def test_idle_cached_pages_are_evicted_for_a_job_that_needs_them(tok: Any, model: Any) -> None:
    opts = dict(JOB, workers=2, trace=False, instructions="full")
    probe = make_engine(tok, model)
    pages = probe.submit("Add 2 and 3.", **opts).pages_needed(probe.pool)
    eng = make_engine(tok, model, num_pages=pages)
    first = eng.generate("Add 2 and 3.", **opts)
    keys = first.prompt_pages.keys(eng.pool)
    assert eng.pool.evictable == len(keys) > pages // 2  # idle cached pages fill most of the pool
    assert eng.free_pages == eng.total_pages  # ... and count as free for admission
    other = eng.generate("Count the sevens: " + "seven " * 500, **dict(opts, instructions="none"))
    opening = common_prefix(first.prompt_ids, other.prompt_ids) // eng.pool.page_size
    assert other.status == "finished" and other.cached_tokens == opening * eng.pool.page_size  # the template
    assert eng.pool.evictions > 0
    # A prefix's last pages go first, so what is left of it can still be read.
    still = [eng.pool.cached(k) is not None for k in keys]
    kept = still.count(True)
    assert 0 < kept < len(keys) and still == [True] * kept + [False] * (len(keys) - kept)
    again = eng.generate("Add 2 and 3.", **opts)
    assert again.cached_tokens == kept * eng.pool.page_size
    assert eng.pool.whole


def test_a_cached_prefix_lowers_the_reservation_so_a_second_job_fits(tok: Any, model: Any) -> None:
    probe = make_engine(tok, model)
    opts = dict(JOB, workers=2, trace=False, max_tokens=40)
    job = probe.submit("Add 2 and 3.", **opts)
    pages = job.pages_needed(probe.pool)
    prompt_pages = (len(job.prompt_ids) - 1) // probe.pool.page_size
    # The first job's prompt pages are pinned once published; the second holds them in place of as many
    # pages of its own reservation: room for exactly both jobs.
    eng = make_engine(tok, model, num_pages=2 * pages - prompt_pages)
    first = eng.submit("Add 2 and 3.", **opts)
    while first.status != "running":
        eng.step()
    second = eng.submit("Add 2 and 3.", **opts)
    eng.step()
    assert second.status != "queued"  # it fits only because it shares the first one's prompt pages
    run(eng, [first, second])
    off = make_engine(tok, model, num_pages=2 * pages - prompt_pages, prefix_cache=False)
    jobs = [off.submit("Add 2 and 3.", **opts) for _ in range(2)]
    off.step()
    assert jobs[1].status == "queued"
    for job in jobs:
        off.cancel(job.id)
    assert off.pool.whole and off.pool.evictable == 0


def test_the_cache_off_shares_nothing(tok: Any, model: Any) -> None:
    eng = make_engine(tok, model, prefix_cache=False)
    jobs = [eng.submit("Add 2 and 3.", **dict(JOB, workers=2)) for _ in range(3)]
    run(eng, jobs)
    assert [j.cached_tokens for j in jobs] == [0, 0, 0]
    assert eng.pool.queries == eng.pool.hits == eng.pool.evictable == 0
    assert eng.stats()["prefix_cache"] is False
    assert eng.pool.whole
