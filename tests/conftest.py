from __future__ import annotations

from typing import Any

import pytest

from tests.models import tokenizer


@pytest.fixture(scope="session")
def tok() -> Any:
    return tokenizer()
