"""The collaboration format's rules on tiny models: presets, cut marks, format guards, answers, checkpoints.

Where a rule is about text (an answer, a forged header) the workers' tokens are scripted: the engine's
sampler is wrapped so that chosen rows write chosen text; everything else (the forward pass, the rules,
the pages) runs as in production.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
import torch

import engine.engine as engine_module
from engine import Engine
from engine.collab import AnswerRule, Layout
from engine.prompts import BUILTIN, load_presets
from engine.protocol import LAYOUTS, worker_name
from tests.models import tiny_model


@pytest.fixture(scope="module")
def eng(tok: Any) -> Engine:
    """Unwired: a worker's steps end only where a test writes the end (rows keep their order)."""
    return Engine.from_hf(tiny_model("llama-gqa4", tok, wired=False), tok, page_size=4, num_pages=8192)


def pool_is_whole(eng: Engine) -> bool:
    return eng.free_pages == eng.total_pages and eng.pool.whole


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("preset", ["full", "short"])
def test_presets_render_for_every_worker_count_and_describe_the_layout(
    eng: Engine, layout: str, preset: str
) -> None:
    for workers in range(1, 9):
        messages = BUILTIN[preset].render([{"role": "user", "content": "What is 2 + 2?"}], workers, layout)
        text = "\n".join(m["content"] for m in messages)
        names = ", ".join(worker_name(i) for i in range(workers))
        assert f"one of {workers} assistants ({names})" in text
        assert messages[-1]["content"].endswith("Problem:\nWhat is 2 + 2?")
        assert "{" not in text.replace("\\boxed{", "").replace("{}", "")  # no placeholder left
        assert ("Work in progress (others)" in text) == (layout == "combined")
        if preset == "full":
            examples = [m for m in messages if m["role"] == "assistant"]
            assert len(examples) == (0 if workers == 1 else 2 if workers == 2 else 3)
            assert all("\\boxed{" in m["content"] for m in examples)
            assert all(worker_name(2) not in m["content"] for m in examples[:2])
    assert BUILTIN["none"].render([{"role": "user", "content": "q"}], 3, layout) == [
        {"role": "user", "content": "q"}
    ]


def test_more_presets_load_from_a_file_and_a_bad_one_fails_at_start(tmp_path: Any, tok: Any) -> None:
    good = tmp_path / "presets.json"
    good.write_text(
        '{"terse": {"text": "{count} of you: {names}. {layout}", "examples": '
        '[[{"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": "**{A} [1]:** 2"}]]}}'
    )
    assert "terse" in load_presets(good)
    eng = Engine.from_hf(tiny_model("llama-gqa4", tok), tok, num_pages=2048, presets=str(good))
    job = eng.submit("Add 2 and 3.", workers=2, instructions="terse", max_tokens=4)
    text = tok.decode(job.prompt_ids)
    assert "2 of you: Alice, Bob." in text and "**Alice [1]:** 2" in text
    bad = tmp_path / "bad.json"
    bad.write_text('{"oops": {"text": "{nobody}"}}')
    with pytest.raises(ValueError, match="oops"):
        load_presets(bad)


def test_other_workers_steps_end_with_their_own_cut_marks() -> None:
    for layout in ("combined", "contiguous"):
        view = Layout(layout, 4).view(0)
        others = [n for n in view if n.startswith(("step:", "out:"))][:-1]
        for a, b in itertools.pairwise(others):
            assert view[view.index(a) + 1].startswith("cut:"), view  # never two steps back to back
            assert view.index(b) == view.index(a) + 2
        assert len(view) == len(set(view))
    final = Layout("interleaved", 3).finisher_view()
    assert final == [
        "common",
        "others_header",
        "step:Alice",
        "cut:1",
        "step:Bob",
        "cut:2",
        "step:Carol",
        "cut:3",
    ]


def test_answer_rule_skips_placeholders_and_takes_the_rightmost_box() -> None:
    rule = AnswerRule()
    assert rule.find("write it as \\boxed{answer}.") is None
    assert rule.find("\\boxed{} and \\boxed{ Answer }") is None
    assert rule.find("\\boxed{12} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert rule.find("\\boxed{7} then \\boxed{answer}") is None  # the rightmost box is the claim
    choice = AnswerRule(r"Answer: \(([A-D])\)")
    assert choice.find("Answer: (B) ... no, Answer: (C)") == "C"


class Script:
    """Wraps the engine's sampler: the first rows of job ``job_id``'s worker 0 write ``text``, token by
    token; every other row samples as usual."""

    def __init__(self, eng: Engine, monkeypatch: pytest.MonkeyPatch, tok: Any) -> None:
        self.queues: dict[int, list[int]] = {}
        self.tok = tok
        real = engine_module.sample
        script = self

        def scripted(logits: torch.Tensor, groups: Any, record: bool = False, row_bans: Any = ()) -> Any:
            tokens, draws, logprobs = real(logits, groups, record, row_bans)
            for row, queue in script.queues.items():
                if queue and row < len(tokens):
                    tokens[row] = queue.pop(0)
            return tokens, draws, logprobs

        monkeypatch.setattr(engine_module, "sample", scripted)

    def write(self, row: int, text: str) -> None:
        self.queues.setdefault(row, []).extend(self.tok.encode(text, add_special_tokens=False))


def test_a_placeholder_never_ends_a_job_and_a_box_counts_at_the_end_of_its_step(
    eng: Engine, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(eng, monkeypatch, tok)
    job = eng.submit("Add 2 and 3.", workers=1, max_tokens=60, finisher=False)
    while job.status != "running":
        eng.step()
    eng.step()  # the opener
    script.write(0, "I write \\boxed{answer} as asked.\n\nNow \\boxed{5} is it, I think")
    seen: list[str] = []
    while not job.ended and len(seen) < 60:
        eng.step()
        seen.append(job.workers[0].text)
        if "\\boxed{5}" in seen[-1]:
            break
    assert not job.ended, "the placeholder or a mid-step box ended the job"
    script.write(0, ".\n\n")
    while not job.ended:
        eng.step()
    assert job.answer == "5" and job.finish_reason == "answer"
    assert pool_is_whole(eng)


def test_format_guards_are_never_sampled(eng: Engine, tok: Any) -> None:
    """The guarded tokens pushed to the top by a bias: with the guards on no worker writes one, greedy
    or sampled; with them off they win."""
    hashes = [i for i, t in enumerate(eng.vocab) if "#" in t][:5]
    push = dict.fromkeys([*hashes, *eng.eos_ids], 50.0)
    for temperature in (0.0, 1.0):
        job = eng.generate(
            "q", workers=2, max_tokens=12, finisher=False, temperature=temperature, seed=3, logit_bias=push
        )
        generated = [t for w in job.workers for t in w.detok.tokens]
        assert set(generated).isdisjoint(eng.guards), temperature
        assert all(w.finish_reason == "length" for w in job.workers)  # EOS is banned too
    off = eng.generate("q", workers=2, max_tokens=12, finisher=False, logit_bias=push, suppress=False)
    assert any(t in hashes or t in eng.eos_ids for w in off.workers for t in w.detok.tokens)
    assert pool_is_whole(eng)


def test_a_worker_cannot_forge_a_step_header(eng: Engine, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(eng, monkeypatch, tok)
    bracket = tok.encode(" [", add_special_tokens=False)[0]
    job = eng.submit("q", workers=2, max_tokens=20, finisher=False, logit_bias={bracket: 60.0})
    while job.status != "running":
        eng.step()
    eng.step()  # the openers
    script.write(0, " Then **Bob")
    while not job.ended:
        eng.step()
    alice = job.workers[0].text
    assert "**Bob" in alice and not re.search(r"\*\*Bob ?\[", alice), alice
    assert alice.split("**Bob", 1)[1].count(" [") >= 5  # the bias still wins everywhere else


def test_checkpoints_leave_the_workers_untouched_and_give_their_pages_back(eng: Engine) -> None:
    options: dict[str, Any] = dict(workers=3, max_tokens=24, temperature=0.9, seed=11, quick_check_every=5)
    plain = eng.generate("Add 2 and 3.", **options)
    checked = eng.generate("Add 2 and 3.", checkpoints=[4, 8, 16, 24], **options)
    assert [w.detok.tokens for w in checked.workers[1:]] == [w.detok.tokens for w in plain.workers[1:]]
    assert checked.workers[0].text == plain.workers[0].text  # the final finisher's text included
    assert [c["budget"] for c in checked.checkpoints] == [4, 8, 16, 24]
    assert all(c["tokens"] >= 3 * c["budget"] for c in checked.checkpoints[:3])
    assert checked.usage["checkpoint_tokens"] > 0 and plain.usage["checkpoint_tokens"] == 0
    assert checked.usage["completion_tokens"] == plain.usage["completion_tokens"]
    assert checked.checkpoints[-1]["tokens"] == 3 * 24  # the workers' tokens, not the finisher's
    assert checked.checkpoints[-1]["answer"] == checked.answer  # the last budget is the job's end
    assert pool_is_whole(eng)


def test_a_checkpoint_past_an_answer_reads_the_answer(
    eng: Engine, tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Script(eng, monkeypatch, tok)
    job = eng.submit("q", workers=1, max_tokens=40, checkpoints=[2, 30, 40])
    while job.status != "running":
        eng.step()
    eng.step()
    script.write(0, "So it is \\boxed{7}.\n\n")
    while not job.ended:
        eng.step()
    assert job.answer == "7"
    assert [(c["budget"], c["answer"]) for c in job.checkpoints][1:] == [(30, "7"), (40, "7")]
    assert pool_is_whole(eng)


def test_the_plain_layout_is_one_ordinary_sequence(tok: Any) -> None:
    model = tiny_model("llama-gqa4", tok, wired=False)
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=1024)
    job = eng.generate("Add 2 and 3.", workers=1, layout="plain", max_tokens=6, finisher=False)
    ids = torch.tensor([job.prompt_ids])
    with torch.no_grad():
        expected = model.generate(  # type: ignore[operator]
            ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids)
        )
    assert job.workers[0].detok.tokens == expected[0, ids.shape[1] :].tolist()
    assert "**Alice" not in job.workers[0].text
    assert job.usage["forced_tokens"] == 0 and job.usage["completion_tokens"] == 6
    with pytest.raises(Exception, match="workers must be 1"):
        eng.submit("q", workers=2, layout="plain")


def test_sampling_defaults_come_from_the_model(tok: Any) -> None:
    model = tiny_model("llama-gqa4", tok)
    model.generation_config.do_sample = True
    model.generation_config.temperature, model.generation_config.top_p = 0.6, 0.95
    model.generation_config.top_k = 40
    eng = Engine.from_hf(model, tok, num_pages=2048)
    job = eng.submit("q", workers=2, max_tokens=4)
    assert job.resolved_options == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 40,
        "instructions": "full",
        "suppressed_tokens": len(eng.guards),
    }
    assert eng.submit("q", workers=2, max_tokens=4, temperature=0).sampling.greedy
