"""The forward pass of Llama-family decoder models, written over the paged Hogwild pool.

One module covers Llama 2/3, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm) and SmolLM2: they differ only
in biases, norms and tied embeddings, all read off the checkpoint. q/k/v and gate/up are fused into one
matmul each, since on a CPU the decode step is dominated by per-op overhead and weight reads. A config
that asks for math this forward does not do is refused at load time (``check_config``), never served
approximately.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.linear import Kernel, Linear
from engine.layers.ops import TorchOps
from engine.layers.rotary import UnsupportedModelError
from engine.models.step_inputs import StepInputs

# Config keys that change the math, with the values this forward implements. Keys a family does not have
# read as None. Biases are read off the checkpoint's tensors; RoPE types are checked by Rotary; the
# sliding window by ``sliding_window``.
SUPPORTED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu", "swish"),
    "partial_rotary_factor": (None, 1, 1.0),
    "pretraining_tp": (None, 1),  # >1 splits the matmuls; transformers' own forward no longer does
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "quantization_config": (None,),
}


def check_config(config: PretrainedConfig) -> None:
    """Refuse, naming the key, any config whose math this forward would silently get wrong."""
    for key, allowed in SUPPORTED_VALUES.items():
        value = getattr(config, key, None)
        if value not in allowed:
            raise UnsupportedModelError(
                f"the model's config sets {key}={value!r}; this engine implements only "
                f"{', '.join(repr(a) for a in allowed if a is not None)}"
            )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(
            f"partial rotary embeddings (partial_rotary_factor={rope['partial_rotary_factor']}) are not "
            "supported: RoPE is applied to the whole head"
        )
    heads, head_dim = config.num_attention_heads, getattr(config, "head_dim", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise UnsupportedModelError(f"{heads} attention heads do not divide into {kv_heads} KV heads")
    if head_dim is None and config.hidden_size % heads:
        raise UnsupportedModelError(f"hidden_size {config.hidden_size} does not divide into {heads} heads")
    if (head_dim or config.hidden_size // heads) % 2:
        raise UnsupportedModelError(f"head_dim {head_dim} is odd: RoPE rotates pairs of dimensions")


def sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window of the model's sliding layers, or None when every layer attends to all.
    transformers marks the sliding layers in ``layer_types`` (Qwen2/3 past ``max_window_layers`` when
    ``use_sliding_window``); a config with a window and no layer types (Mistral) slides in every layer."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    qk_norm: bool
    tie_embeddings: bool
    max_positions: int
    o_bias: bool = False  # Llama's attention_bias puts a bias on o_proj too
    mlp_bias: bool = False  # Llama's mlp_bias: gate, up and down
    tensor_parallel: int = 1  # >1: one rank's share (``sharded``), heads and MLP counted per rank

    def sharded(self, world: int) -> ModelShape:
        """One rank's share of the model when split over ``world`` ranks (engine/parallel.py): its heads,
        KV heads (at least one: a KV head may be copied to several ranks) and MLP channels. Its LM head
        holds a slice of the vocabulary of its own, so it is no longer tied to the embeddings."""
        if world == 1:
            return self
        return replace(
            self,
            num_heads=self.num_heads // world,
            num_kv_heads=max(1, self.num_kv_heads // world),
            intermediate_size=self.intermediate_size // world,
            tie_embeddings=False,
            tensor_parallel=world,
        )

    @property
    def lm_head_rows(self) -> int:
        """Rows of this rank's LM head: the vocabulary split evenly, the last slice padded."""
        return -(-self.vocab_size // self.tensor_parallel)

    @classmethod
    def from_config(cls, config: PretrainedConfig, state: dict[str, torch.Tensor]) -> ModelShape:
        """The shape of the checkpoint; positions are capped at the sliding window, so that no view ever
        reaches past it and full attention is exactly what the model computes."""
        check_config(config)
        heads = config.num_attention_heads
        window = sliding_window(config)
        layer0 = "model.layers.0."
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            rms_norm_eps=config.rms_norm_eps,
            qkv_bias=layer0 + "self_attn.q_proj.bias" in state,
            qk_norm=layer0 + "self_attn.q_norm.weight" in state,
            tie_embeddings="lm_head.weight" not in state
            or bool(getattr(config, "tie_word_embeddings", False)),
            max_positions=min(config.max_position_embeddings, window or config.max_position_embeddings),
            o_bias=layer0 + "self_attn.o_proj.bias" in state,
            mlp_bias=layer0 + "mlp.gate_proj.bias" in state,
        )


class RMSNorm(nn.Module):
    """A norm's weight and epsilon; the op is the step's (``StepInputs.ops``), fused with the residual add."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class Attention(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        self.q_size = shape.num_heads * shape.head_dim
        self.kv_size = shape.num_kv_heads * shape.head_dim
        self.qkv_proj = Linear(shape.hidden_size, self.q_size + 2 * self.kv_size, bias=shape.qkv_bias)
        self.o_proj = Linear(self.q_size, shape.hidden_size, bias=shape.o_bias)
        self.q_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps) if shape.qk_norm else None
        self.k_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps) if shape.qk_norm else None
        self.scale = shape.head_dim**-0.5

    @property
    def qk_norms(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The per-head q and k norm weights (Qwen3); None for models without them."""
        if self.q_norm is None or self.k_norm is None:
            return None
        return self.q_norm.weight, self.k_norm.weight

    def forward(self, x: torch.Tensor, layer: int, step: StepInputs) -> torch.Tensor:
        # Write before attending: every row of this step sees every other row's new tokens.
        q = step.ops.qkv_epilogue(self.qkv_proj(x), self, layer, step)
        out = step.attention(q, step.k_pool[layer], step.v_pool[layer], step.plan, self.scale)
        return self.o_proj(out.reshape(x.shape[0], self.q_size))


class MLP(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.gate_up_proj = Linear(shape.hidden_size, 2 * shape.intermediate_size, bias=shape.mlp_bias)
        self.down_proj = Linear(shape.intermediate_size, shape.hidden_size, bias=shape.mlp_bias)

    def forward(self, x: torch.Tensor, ops: TorchOps) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, layer: int, step: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the previous layer's residual add is done
        here, in one op with this layer's first norm."""
        ops, norm, post = step.ops, self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual, h = x, ops.rms_norm(x, norm.weight, norm.eps)
        else:
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        h = self.self_attn(h, layer, step)
        h, residual = ops.add_rms_norm(h, residual, post.weight, post.eps)
        return self.mlp(h, ops), residual


class LlamaModel(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(shape) for _ in range(shape.num_layers)])
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.lm_head = Linear(shape.hidden_size, shape.lm_head_rows, bias=False)
        if shape.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def load(
        cls, shape: ModelShape, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> LlamaModel:
        """The model with a transformers checkpoint's tensors, on ``device``; built on the meta device
        first, so the weights are allocated once."""
        with torch.device("meta"):
            model = cls(shape)
        model = model.to_empty(device=device).to(dtype)
        model.load_hf_state({k: v.to(device) for k, v in state.items()})
        return model.eval()

    def forward(self, input_ids: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """Hidden states [N, hidden] of the packed new tokens; K/V land in the pool as a side effect."""
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, i, step)
        assert residual is not None
        return step.ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def use_kernel(self, kernel: Kernel) -> None:
        """Route the small-batch products of every linear layer whose weight suits it to ``kernel``."""
        for m in self.modules():
            if isinstance(m, Linear) and m.fits_kernel():
                m.kernel = kernel

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_hf_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a transformers checkpoint's tensors in, fusing q/k/v and gate/up (and their biases)."""
        own: dict[str, torch.Tensor] = {}
        for i in range(self.shape.num_layers):
            pre = f"model.layers.{i}."
            attn, mlp = pre + "self_attn.", pre + "mlp."
            shape = self.shape
            fused = [  # (our layer, the checkpoint's layers it concatenates, whether they have biases)
                ("self_attn.qkv_proj", [attn + f"{n}_proj" for n in "qkv"], shape.qkv_bias),
                ("self_attn.o_proj", [attn + "o_proj"], shape.o_bias),
                ("mlp.gate_up_proj", [mlp + "gate_proj", mlp + "up_proj"], shape.mlp_bias),
                ("mlp.down_proj", [mlp + "down_proj"], shape.mlp_bias),
            ]
            for name, sources, bias in fused:
                own[f"layers.{i}.{name}.weight"] = torch.cat([state[s + ".weight"] for s in sources])
                if bias:
                    own[f"layers.{i}.{name}.bias"] = torch.cat([state[s + ".bias"] for s in sources])
            if self.shape.qk_norm:
                own[f"layers.{i}.self_attn.q_norm.weight"] = state[attn + "q_norm.weight"]
                own[f"layers.{i}.self_attn.k_norm.weight"] = state[attn + "k_norm.weight"]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                own[f"layers.{i}.{norm}.weight"] = state[pre + f"{norm}.weight"]
        own["embed_tokens.weight"] = state["model.embed_tokens.weight"]
        own["norm.weight"] = state["model.norm.weight"]
        own["lm_head.weight"] = state[
            "model.embed_tokens.weight" if self.shape.tie_embeddings else "lm_head.weight"
        ]
        self.load_state_dict(own, strict=True)
        if self.shape.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
