"""Engine behaviour on tiny random models: memory, batching across jobs, visibility, sampling, rules."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from engine import Engine, InvalidRequest, PromptTooLong, UnsupportedModelError
from engine.collab import ends_step, find_boxed
from engine.sampling import SamplingParams, draw, sample
from engine.step_batch import Staging
from tests.models import tiny_model


def make_engine(tok: Any, family: str = "llama-gqa4", wired: bool = True, **options: Any) -> Engine:
    options.setdefault("page_size", 4)
    options.setdefault("num_pages", 4096)
    return Engine.from_hf(tiny_model(family, tok, wired=wired), tok, **options)


def run(eng: Engine, jobs: list[Any]) -> list[Any]:
    events = []
    while not all(j.ended for j in jobs):
        events += eng.step()
    return events


def worker_logits(job: Any) -> list[dict[int, torch.Tensor]]:
    """Per decode step, each worker's logits (prefill steps depend on the shared chunk budget)."""
    steps = [s for s in job.trace if any(r.worker >= 0 for r in s.rows)]
    return [{r.worker: r.logits for r in step.rows if r.logits is not None} for step in steps]


def test_pool_is_full_again_after_finished_and_cancelled_jobs(tok: Any) -> None:
    eng = make_engine(tok)
    jobs = [
        eng.submit("a", workers=w, layout=layout, max_tokens=12)
        for w, layout in [(1, "combined"), (3, "interleaved"), (2, "contiguous"), (5, "combined")]
    ]
    for _ in range(6):
        eng.step()
    assert eng.free_pages < eng.total_pages
    assert eng.cancel(jobs[1].id) and jobs[1].status == "cancelled"
    queued = eng.submit("b", workers=2, max_tokens=8)
    assert eng.cancel(queued.id)
    run(eng, jobs[:1] + jobs[2:])
    assert all(j.status == "finished" for j in jobs[:1] + jobs[2:])
    assert eng.free_pages == eng.total_pages
    assert eng.pool.whole
    assert not eng.running and not eng.queue


def test_job_that_cannot_get_pages_waits_instead_of_failing_a_running_one(tok: Any) -> None:
    eng = make_engine(tok)
    pages = eng.submit("a", workers=2, max_tokens=40).pages_needed(eng.pool)
    eng = make_engine(tok, num_pages=pages + pages // 2)  # one job fits, two do not
    first = eng.submit("a", workers=2, max_tokens=40)
    eng.step()
    second = eng.submit("b", workers=2, max_tokens=40)
    eng.step()
    assert first.status in ("prefill", "running") and second.status == "queued"
    run(eng, [first, second])
    assert first.status == second.status == "finished"
    assert eng.free_pages == eng.total_pages


def test_job_larger_than_the_pool_is_rejected(tok: Any) -> None:
    eng = make_engine(tok, num_pages=64)
    with pytest.raises(ValueError, match="pages"):
        eng.submit("a", workers=4, max_tokens=400)


@pytest.mark.parametrize("sampled", [False, True])
def test_concurrent_jobs_match_each_job_alone(tok: Any, sampled: bool) -> None:
    specs: list[dict[str, Any]] = [
        dict(workers=2, layout="combined"),
        dict(workers=3, layout="interleaved"),
        dict(workers=1, layout="contiguous"),
        dict(workers=4, layout="contiguous"),
    ]
    common: dict[str, Any] = dict(max_tokens=24, trace=True, finisher=False)
    if sampled:
        common.update(temperature=0.9, top_p=0.95, top_k=50)
    alone = []
    for i, spec in enumerate(specs):
        eng = make_engine(tok)
        alone.append(eng.generate(f"problem {i}", seed=i, **spec, **common))
    eng = make_engine(tok)
    together = [eng.submit(f"problem {i}", seed=i, **spec, **common) for i, spec in enumerate(specs)]
    run(eng, together)
    for a, b in zip(alone, together, strict=False):
        assert [w.detok.tokens for w in a.workers] == [w.detok.tokens for w in b.workers]
        for la, lb in zip(worker_logits(a), worker_logits(b), strict=False):
            assert la.keys() == lb.keys()
            for w in la:
                torch.testing.assert_close(la[w], lb[w], atol=1e-4, rtol=0)


def _alter_bob_and_watch_alice(tok: Any, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two identical jobs; in the second, Bob's next token is swapped. Alice's logits in that step."""
    # No instructions and no prefix cache (the second job would wait for the first's pages): both prompts
    # are prefilled in the same step, so the jobs stay in step.
    eng = make_engine(tok, wired=False, prefix_cache=False)
    kw: dict[str, Any] = dict(workers=2, layout=layout, max_tokens=20, trace=True, instructions="none")
    jobs = [eng.submit("same", **kw) for _ in range(2)]
    assert jobs[0].workers[1].generated == jobs[1].workers[1].generated
    while jobs[0].workers[1].generated < 3:
        eng.step()
    bob = jobs[1].workers[1]
    assert not bob.rollover_after and len(bob.pending) == 1
    bob.pending = [(bob.pending[0] + 7) % 1000]
    assert jobs[0].workers[0].detok.tokens == jobs[1].workers[0].detok.tokens
    eng.step()
    a, b = jobs[0].trace[-1].rows[0].logits, jobs[1].trace[-1].rows[0].logits
    assert a is not None and b is not None
    return a, b


def test_combined_layout_sees_others_in_progress_tokens(tok: Any) -> None:
    a, b = _alter_bob_and_watch_alice(tok, "combined")
    assert (a - b).abs().max() > 1e-4


def test_interleaved_layout_hides_unfinished_steps(tok: Any) -> None:
    a, b = _alter_bob_and_watch_alice(tok, "interleaved")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_one_worker_contiguous_equals_generate(tok: Any) -> None:
    model = tiny_model("qwen3-qknorm", tok, wired=False)
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=1024)
    job = eng.generate("Tell me a story.", workers=1, layout="contiguous", max_tokens=30, finisher=False)
    worker = job.workers[0]
    view = job.view(0)
    assert [name for name, _ in view] == ["common", "own_header", "out:Alice"]
    opener_len = len(worker.detok.tokens) - worker.generated
    prefix = view[0][1] + view[1][1] + worker.detok.tokens[:opener_len]
    out = model.generate(  # type: ignore[operator]
        torch.tensor([prefix]), max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert worker.detok.tokens[opener_len:] == out[0, len(prefix) :].tolist()


def test_same_seed_same_tokens_other_seed_other_tokens(tok: Any) -> None:
    eng = make_engine(tok, wired=False)
    kw: dict[str, Any] = dict(workers=2, max_tokens=16, temperature=1.0, finisher=False)
    a, b, c = (eng.generate("x", seed=s, **kw) for s in (7, 7, 8))
    tokens = [[w.detok.tokens for w in j.workers] for j in (a, b, c)]
    assert tokens[0] == tokens[1] != tokens[2]


def test_events_rebuild_every_worker_text_and_the_history(tok: Any) -> None:
    eng = make_engine(tok)
    job = eng.submit("q", workers=3, max_tokens=30, quick_check_every=20)
    events = run(eng, [job])
    assert [e.seq for e in events] == list(range(len(events)))
    for w in job.workers:
        tokens = [e.data for e in events if e.type == "token" and e.data["worker"] == w.index]
        assert "".join(d["text"] for d in tokens) == w.text
        assert [d["index"] for d in tokens] == list(range(len(tokens)))
    steps = [e for e in events if e.type == "step"]
    assert len(steps) >= 3
    assert [(e.data["worker"], e.data["text"]) for e in steps] == [
        (h["worker"], h["text"]) for h in job.history
    ]
    assert any(e.type == "quick_check" for e in events)
    assert any("Quick check:" in w.text for w in job.workers)
    assert events[-1].type == "done" and events[-1].data["finish_reason"] == "length"
    # The finisher ran: worker 0 was asked for the answer, and whatever it wrote is the answer.
    assert "\\boxed{" in job.workers[0].text and events[-2].type == "final"


def test_cancel_frees_pages_at_once_and_ends_with_cancelled(tok: Any) -> None:
    eng = make_engine(tok)
    job = eng.submit("q", workers=2, max_tokens=200)
    for _ in range(5):
        eng.step()
    assert eng.cancel(job.id)
    assert eng.free_pages == eng.total_pages and eng.pool.whole
    events = eng.step()
    assert events[-1].type == "done" and events[-1].data["finish_reason"] == "cancelled"
    assert not eng.cancel(job.id)


def test_stop_strings_and_max_tokens(tok: Any) -> None:
    eng = make_engine(tok, wired=False)
    free = eng.generate("q", workers=1, max_tokens=12, finisher=False)
    assert free.workers[0].generated == 12 and free.finish_reason == "length"
    stop = free.workers[0].text[-8:-4]
    stopped = eng.generate("q", workers=1, max_tokens=12, finisher=False, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.workers[0].generated < 12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(workers=0), "workers"),
        (dict(workers=99), "workers"),
        (dict(layout="spiral"), "layout"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(quick_check_every=-1), "quick_check_every"),
        (dict(logit_bias={10**9: 1.0}), "logit_bias"),
        (dict(max_tokens=4000, workers=4), "prompt too long"),
    ],
)
def test_bad_submissions_are_refused_with_a_message(tok: Any, kwargs: dict[str, Any], message: str) -> None:
    eng = make_engine(tok)
    with pytest.raises(InvalidRequest, match=message) as refused:
        eng.submit("q", **kwargs)
    assert refused.value.field == (message if message in kwargs else "prompt")
    assert isinstance(refused.value, PromptTooLong) == (message == "prompt too long")
    assert not eng.jobs


def test_dynamic_ntk_is_refused(tok: Any) -> None:
    model = tiny_model("llama-gqa4", tok)
    model.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        Engine.from_hf(model, tok)


def test_step_rule() -> None:
    assert ends_step("So x = 2.\n\n", "\n\n")
    assert ends_step("Done!\n\n", "!\n\n")
    assert not ends_step("So x = 2\n\n", "\n\n")  # no sentence end
    assert ends_step("So x = 2.\n\n", "\n")  # the break written as two newline tokens
    assert not ends_step("So x = 2.\n", "\n")  # only a line break so far
    assert not ends_step("See:\n```\ncode.\n\n", "\n\n")  # open code block
    assert not ends_step("$$x = 1.\n\n", "\n\n")  # open display math
    assert not ends_step("Hello.", ".")


def test_answer_detection() -> None:
    assert find_boxed("so \\boxed{42}.") == "42"
    assert find_boxed("\\boxed{\\frac{1}{2}} then \\boxed{3}") == "3"
    assert find_boxed("\\boxed{\\frac{1}{2}") is None
    assert find_boxed("no answer") is None


def test_logit_bias_steers_greedy_and_sampled_choices(tok: Any) -> None:
    eng = make_engine(tok, wired=False)
    target = tok.encode(" banana", add_special_tokens=False)[0]
    for temperature in (0.0, 1.0):
        job = eng.generate(
            "q", workers=2, max_tokens=5, finisher=False, temperature=temperature, logit_bias={target: 100.0}
        )
        assert all(w.detok.tokens[-5:] == [target] * 5 for w in job.workers)


def test_sampling_draws_tokens_in_proportion_and_never_a_cut_one() -> None:
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]).repeat(10000, 1)
    u = torch.rand(len(probs), 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tokens = draw(probs, u).view(10000, 2)
    first = torch.bincount(tokens[:, 0], minlength=5) / 10000
    torch.testing.assert_close(first, probs[0], atol=0.015, rtol=0)
    assert first[1] == first[4] == 0
    assert torch.all(tokens[:, 1] == 4)


def test_tiny_temperatures_are_greedy_and_nan_probabilities_stay_in_the_vocabulary() -> None:
    assert SamplingParams(temperature=1e-40).greedy and not SamplingParams(temperature=0.5).greedy
    nan = torch.full((2, 7), float("nan"))
    assert draw(nan, torch.rand(2, 1, dtype=torch.float64)).tolist() == [6, 6]


def test_staging_packs_each_tensor_at_a_16_byte_boundary() -> None:
    """A CUDA graph's static buffer holds the step's tensors back to back; each must start aligned, or
    Triton compiles a new kernel variant whenever a tensor's length changes the alignment of the next."""
    tensors = [torch.arange(n, dtype=torch.int32).view(-1, 1) for n in (1, 5, 3, 8, 2)]
    buffer = torch.empty(sum(Staging.spans(tensors)), dtype=torch.int32)
    sent = Staging(torch.device("cpu")).send(tensors, out=buffer)
    for original, view in zip(tensors, sent, strict=True):
        assert view.data_ptr() % 16 == 0 and view.untyped_storage().data_ptr() == buffer.data_ptr()
        assert torch.equal(view, original)


def test_logprobs_are_the_raw_models_own_and_only_on_asked_sampled_tokens(tok: Any) -> None:
    """A token's logprob and its top alternatives match a log-softmax of transformers' own forward pass:
    the raw distribution, before logit_bias and temperature (vLLM's default)."""
    model = tiny_model("qwen3-qknorm", tok, wired=False)
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=1024)
    bias = {tok.encode(" banana", add_special_tokens=False)[0]: 3.0}
    kw: dict[str, Any] = dict(
        workers=1, layout="plain", max_tokens=8, finisher=False, seed=3, logit_bias=bias
    )
    job = eng.submit("Tell me a story.", temperature=1.5, logprobs=5, **kw)
    other = eng.submit("Tell me a story.", temperature=1.5, **kw)  # in the same steps, asking for none
    events = run(eng, [job, other])
    sampled = [e.data for e in events if e.job_id == job.id and e.type == "token" and not e.data["forced"]]
    assert len(sampled) == job.workers[0].generated > 0
    assert all("logprob" not in e.data for e in events if e.job_id == other.id and e.type == "token")
    ids = job.prompt_ids + [d["token_id"] for d in sampled]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    reference = torch.log_softmax(logits[len(job.prompt_ids) - 1 : -1], dim=-1)
    assert torch.allclose(reference.exp().sum(-1), torch.ones(len(sampled)), atol=1e-5)
    for data, ref in zip(sampled, reference, strict=True):
        assert data["logprob"] == pytest.approx(ref[data["token_id"]].item(), abs=1e-3)
        top = data["top_logprobs"]
        assert [t["token_id"] for t in top] == ref.topk(5).indices.tolist()
        assert [t["logprob"] for t in top] == pytest.approx(ref.topk(5).values.tolist(), abs=1e-3)
        assert sum(math.exp(t["logprob"]) for t in top) <= 1
        assert all(t["text"] == tok.decode([t["token_id"]]) for t in top)
    # Asking changes nothing else: the same seed samples the same tokens.
    assert job.workers[0].detok.tokens == other.workers[0].detok.tokens


def test_sample_reports_logprobs_per_group_beside_a_traces_uniforms() -> None:
    """Rows that ask and rows that do not, greedy and sampled, with the trace's uniforms in the same copy."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    groups: list[Any] = [
        (slice(0, 2), SamplingParams(logprobs=3, logit_bias=((7, 50.0),)), None),
        (slice(2, 3), SamplingParams(temperature=1.0), torch.Generator().manual_seed(1)),
        (slice(3, 5), SamplingParams(temperature=1.0, logprobs=0), torch.Generator().manual_seed(2)),
    ]
    ids, uniforms, scores = sample(logits, groups, record=True)
    assert ids[:2] == [7, 7] and uniforms[:2] == [None, None] and all(u is not None for u in uniforms[2:])
    reference = torch.log_softmax(logits, dim=-1)  # the raw distribution: the bias is not in it
    assert scores[2] is None
    for row in (0, 1, 3, 4):
        score = scores[row]
        assert score is not None and score[0] == pytest.approx(reference[row, ids[row]].item(), abs=1e-6)
        assert [t for t, _ in score[1]] == (reference[row].topk(3).indices.tolist() if row < 2 else [])
