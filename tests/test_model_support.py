"""Model features: what a checkpoint asks for is either computed exactly or refused at load time.

A one-worker contiguous job is one flat sequence (common, the split marker, the worker's own block), so its
logits can be checked against transformers' plain forward of the same tokens, with no Hogwild machinery.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import Engine, PromptTooLong, UnsupportedModelError
from tests.models import random_model


def flat_logits_match(model: Any, tok: Any, **options: Any) -> int:
    """Run a one-worker contiguous job; every decode step's logits must equal transformers' forward over
    the job's whole sequence so far. Returns the steps compared."""
    eng = Engine.from_hf(model, tok, page_size=4, num_pages=1024, attention="vectorized", **options)
    job = eng.generate(
        "Add 2 and 3.", workers=1, layout="contiguous", max_tokens=12, finisher=False, trace=True
    )
    sequence: list[int] = []
    compared = 0
    seen = job.view_names(0)  # static blocks outside the worker's view (cut marks) are not its text
    for step in job.trace:
        for row in step.rows:
            if row.block not in seen:
                continue
            sequence += row.tokens
            if row.logits is None:
                continue
            with torch.no_grad():
                expected = model(torch.tensor([sequence])).logits[0, -1].float()
            spread = (expected.max() - expected.min()).item()
            assert (row.logits - expected).abs().max().item() <= 1e-5 * spread, f"step {compared}"
            compared += 1
    return compared


def test_llama_attention_and_mlp_biases_are_loaded(tok: Any) -> None:
    """o_proj's and the MLP's biases were dropped: logits were off by several times their spread."""
    model = random_model("llama-bias", len(tok))
    assert model.model.layers[0].self_attn.o_proj.bias.abs().sum() > 0
    assert model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
    assert flat_logits_match(model, tok) >= 10


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"pretraining_tp": 2}, "pretraining_tp"),
    ],
)
def test_math_the_forward_does_not_do_is_refused_by_name(tok: Any, overrides: dict, named: str) -> None:
    model = random_model("llama-gqa4", len(tok), **overrides)
    with pytest.raises(UnsupportedModelError, match=named):
        Engine.from_hf(model, tok, num_pages=64)


def test_partial_rotary_quantized_and_odd_head_checkpoints_are_refused(tok: Any) -> None:
    model = random_model("llama-gqa4", len(tok))
    model.config.rope_parameters = {**model.config.rope_parameters, "partial_rotary_factor": 0.5}
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        Engine.from_hf(model, tok, num_pages=64)
    model = random_model("llama-gqa4", len(tok))
    model.config.quantization_config = {"quant_method": "awq"}
    with pytest.raises(UnsupportedModelError, match="quantization_config"):
        Engine.from_hf(model, tok, num_pages=64)
    model = random_model("llama-gqa4", len(tok))
    model.config.num_key_value_heads = 3
    with pytest.raises(UnsupportedModelError, match="4 attention heads do not divide into 3 KV heads"):
        Engine.from_hf(model, tok, num_pages=64)


def test_a_sliding_window_caps_the_positions_so_attention_is_exact(tok: Any) -> None:
    """Mistral v0.1 slides a 4096 window: a view past it would attend to keys the model never sees. With
    positions capped at the window every view fits, and full attention is what the model computes."""
    model = random_model("mistral", len(tok), sliding_window=96)
    eng = Engine.from_hf(model, tok, num_pages=256)
    assert eng.shape.max_positions == 96
    with pytest.raises(PromptTooLong, match="96 positions"):
        eng.submit("Add 2 and 3.", workers=2, max_tokens=40)
    assert flat_logits_match(random_model("mistral", len(tok), sliding_window=256), tok) >= 10


def test_qwen2_slides_only_when_asked(tok: Any) -> None:
    sliding = random_model(
        "qwen2-bias", len(tok), use_sliding_window=True, sliding_window=80, max_window_layers=1
    )
    assert Engine.from_hf(sliding, tok, num_pages=64).shape.max_positions == 80
    full = random_model("qwen2-bias", len(tok), use_sliding_window=False, sliding_window=80)
    assert Engine.from_hf(full, tok, num_pages=64).shape.max_positions == 4096
