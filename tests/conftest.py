from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.models import tiny_model, tokenizer


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
