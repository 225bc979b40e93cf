from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Triton's kernels run in its interpreter on the CPU (tests/test_triton_attention.py). The variable must be
# set before triton is first imported, and transformers imports it (through torch._dynamo) below.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from tests.models import tiny_model, tokenizer
from tests.server_process import ServerProcess, running_server


@pytest.fixture(scope="session")
def tok() -> Any:
    return tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Path:
    """A wired tiny model saved with the default tokenizer: what ``--model`` of a spawned process loads."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_model("qwen2-bias", tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on the tiny model for the whole session, requiring ``API_KEY``."""
    with running_server(
        tiny_model_dir, tmp_path_factory.mktemp("server"), "--body-timeout-s", "2"
    ) as running:
        yield running


@pytest.fixture(scope="session")
def server_url(server: ServerProcess) -> str:
    return server.url
