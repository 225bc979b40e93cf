"""The model a benchmark runs: a real checkpoint, or random weights at a real model's shape.

Decode speed depends on the shapes of the weights, not their values, so ``--shape qwen3-8b`` measures an
8B model without downloading 16 GB: the transformers model is built on the meta device (no slow CPU
init) and gets weights only where they are used. The engine copies whatever weights it is handed, so when
``generate`` is not run the transformers model holds zero-stride views of one scalar (no memory) and the
engine's own copy is filled with random values on the device; when ``generate`` runs, the transformers
model is materialized on the device first. Random-weight runs use a built-in byte-level tokenizer: token
identity does not change the speed, and nothing has to be fetched on a GPU machine without a network.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from engine import Engine
from engine.engine import DTYPES, default_dtype

SHAPES: dict[str, tuple[Callable[..., PretrainedConfig], dict[str, Any]]] = {
    "tiny": (
        LlamaConfig,
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=65536,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    # Small enough to run on a CPU, with heads that split two ways: tensor parallelism on the CPU.
    "qwen2.5-0.5b": (
        Qwen2Config,
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "qwen3-8b": (
        Qwen3Config,
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rms_norm_eps=1e-6,
            max_position_embeddings=40960,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
    "llama3-8b": (
        LlamaConfig,
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
    "qwen2.5-32b": (
        Qwen2Config,
        dict(
            vocab_size=152064,
            hidden_size=5120,
            intermediate_size=27648,
            num_hidden_layers=64,
            num_attention_heads=40,
            num_key_value_heads=8,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    ),
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is steadier on a CPU shared with other work",
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: the engine's for the device"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="hub id, folder or .gguf (default: the embedded model)")
    src.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="random weights at this model's shape"
    )


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device and dtype to run in; also applies ``--threads``, which must happen before any work."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return device, DTYPES[args.dtype] if args.dtype else default_dtype(device)


def shape_config(name: str) -> PretrainedConfig:
    config_cls, fields = SHAPES[name]
    return config_cls(**fields, tie_word_embeddings=False)


def model_config(args: argparse.Namespace) -> PretrainedConfig:
    """The config alone (the attention benchmark needs no weights)."""
    from transformers import AutoConfig

    from engine.loader import default_model_dir

    if args.shape:
        return shape_config(args.shape)
    if args.model is None:
        return AutoConfig.from_pretrained(default_model_dir())
    if args.model.endswith(".gguf"):
        return AutoConfig.from_pretrained(Path(args.model).parent, gguf_file=Path(args.model).name)
    return AutoConfig.from_pretrained(args.model)


def byte_tokenizer() -> Any:
    """256 byte tokens plus an end-of-sequence token; ids beyond it decode to nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")


@torch.no_grad()
def randomize_(module: torch.nn.Module) -> None:
    """Norm weights 1, everything else N(0, 0.02): activations stay finite through deep stacks."""
    torch.manual_seed(0)
    for name, param in module.named_parameters():
        if param.dim() == 1 and "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02)


@dataclass
class LoadedModel:
    hf: Any  # a transformers model; at a random shape, materialized only if ``generate`` needs it
    tokenizer: Any
    label: str
    stub_weights: bool  # the transformers model holds zero-stride views, not weights

    def engine(self, device: torch.device, **options: Any) -> Engine:
        if self.stub_weights and options.get("tensor_parallel", 1) > 1:
            # Every rank must read the same weights: made once, on the host, where the ranks take theirs.
            self.hf = self.hf.to_empty(device="cpu")
            randomize_(self.hf)
            self.stub_weights = False
        eng = Engine(self.hf, self.tokenizer, device=device, **options)
        if self.stub_weights:
            randomize_(eng.model)
        return eng


def load(args: argparse.Namespace, materialize: bool) -> LoadedModel:
    """``materialize``: the transformers model itself will run (``generate``), so it needs real tensors."""
    from transformers import AutoModelForCausalLM

    from engine.loader import DEFAULT_NAME, load_hf

    device, dtype = device_and_dtype(args)
    if not args.shape:
        hf, tokenizer = load_hf(args.model, dtype)
        return LoadedModel(hf.to(device).eval(), tokenizer, args.model or DEFAULT_NAME, False)
    config = shape_config(args.shape)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if materialize:
        hf = hf.to_empty(device=device)
        randomize_(hf)
        rotary = hf.model.rotary_emb  # its buffers are not parameters: rebuild them for real
        hf.model.rotary_emb = type(rotary)(config=hf.config).to(device)
    else:
        stub = torch.zeros((), dtype=dtype, device=device)
        hf.load_state_dict({k: stub.expand(v.shape) for k, v in hf.state_dict().items()}, assign=True)
    label = f"{args.shape} shape, random weights"
    return LoadedModel(hf.eval(), byte_tokenizer(), label, stub_weights=not materialize)


@dataclass
class Floor:
    """The weight-read floor: no decode step of a small batch can beat reading every weight once."""

    weight_bytes: int
    bandwidth: float  # bytes/s, measured

    @property
    def ms(self) -> float:
        return 1000 * self.weight_bytes / self.bandwidth

    def describe(self) -> str:
        return (
            f"weight-read floor {self.ms:.2f} ms/step "
            f"({self.weight_bytes / 1e9:.2f} GB at {self.bandwidth / 1e9:.0f} GB/s)"
        )

    def record(self) -> dict[str, float]:
        return {
            "weight_bytes": self.weight_bytes,
            "bandwidth_bytes_per_s": self.bandwidth,
            "weight_floor_ms": self.ms,
        }


def weight_floor(eng: Engine) -> Floor:
    from bench.common import measure_bandwidth

    return Floor(weight_bytes(eng.model), measure_bandwidth(eng.device))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step must read: every weight once, except the input embedding table, of which
    only the looked-up rows are read (unless it is tied to the LM head, which reads it all)."""
    lm_head = getattr(model, "lm_head", None)
    seen: set[int] = set()
    total = 0
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        tied = lm_head is not None and param is lm_head.weight
        if name.startswith("embed_tokens") and not tied:
            continue
        total += param.numel() * param.element_size()
    return total
