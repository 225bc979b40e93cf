"""Tiny random models of each supported family, wired so that workers roll over often.

Random weights almost never write a sentence end followed by a paragraph break, so the step rule would
never fire. The wiring: the LM-head row of "." points along the embedding of the step header's last
token and the row of "\\n\\n" along the embedding of ".", so after a header the model tends to write ".",
then "\\n\\n": a finished step. Everything else stays random; the attention still matters.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from engine.loader import DEFAULT_NAME, cache_dir, default_model_dir

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    max_position_embeddings=4096,
    initializer_range=0.05,
    tie_word_embeddings=False,
)

FAMILIES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "llama-gqa4": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2-bias": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2}),
    "qwen3-qknorm": (Qwen3Config, Qwen3ForCausalLM, {"num_key_value_heads": 2, "head_dim": 16}),
    "llama3-rope": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "yarn-rope": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
            }
        },
    ),
}

# Families the oracle also covers, on fewer layouts and worker counts (FAMILIES covers them all).
MORE_FAMILIES: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "llama-bias": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "linear-rope": (
        LlamaConfig,
        LlamaForCausalLM,
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    # A window no view reaches: served with full attention (positions are capped at the window).
    "mistral": (MistralConfig, MistralForCausalLM, {"num_key_value_heads": 2, "sliding_window": 4096}),
}
ALL_FAMILIES = {**FAMILIES, **MORE_FAMILIES}


def tokenizer() -> Any:
    """The default model's tokenizer; its files alone will do (an offline GPU machine is given just those,
    see bench/gpu_check.sh)."""
    folder = cache_dir() / DEFAULT_NAME
    if not (folder / "tokenizer.json").exists():
        folder = default_model_dir()
    return AutoTokenizer.from_pretrained(folder)


# Seeds whose wired model rolls over at least three times per worker in every layout and worker count.
SEEDS = {"qwen2-bias": 1, "llama-bias": 3}


def random_model(family: str, vocab_size: int, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A float32 model of the family with random weights (biases too: transformers zeroes them)."""
    config_cls, model_cls, extra = ALL_FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=vocab_size, **{**BASE, **extra, **overrides})).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.bias"):  # q/k/v, o and the MLP's
                param.normal_(0, 0.05)
    return model


def tiny_model(family: str, tok: Any, seed: int | None = None, wired: bool = True) -> PreTrainedModel:
    model = random_model(family, len(tok), SEEDS.get(family, 0) if seed is None else seed)
    if wired:
        dot, par = (
            tok.encode(".", add_special_tokens=False)[0],
            tok.encode("\n\n", add_special_tokens=False)[0],
        )
        header_end = tok.encode("**Bob [3]:** ", add_special_tokens=False)[-1]
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            model.lm_head.weight[par] = 3.0 * emb[dot] / emb[dot].norm()
            model.lm_head.weight[dot] = 3.0 * emb[header_end] / emb[header_end].norm()
    return model
