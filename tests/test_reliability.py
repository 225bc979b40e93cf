"""The reliability suite's cheap parts (bench/reliability_bench.py) on a small budget, against the session's
server: what ``python -m bench reliability`` measures at length, held here on every change."""

from __future__ import annotations

import httpx
import pytest

from bench import reliability_bench as reliability
from tests.server_process import API_KEY, ServerProcess

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_every_forbidden_value_of_every_field_is_refused_naming_it(server: ServerProcess) -> None:
    figures = reliability.bad_inputs(server.url, API_KEY)
    assert figures["cases"] > 150  # each field of both bodies, each forbidden JSON type and bound
    assert figures["server_errors"] == figures["wrong"] == 0, figures["examples"]
    assert figures["leaked_pages"] == 0


def test_fuzzing_the_openapi_document_finds_no_server_error(server: ServerProcess) -> None:
    """schemathesis found `"suppress": false` answered 500: a length bound applied to the bool of a union."""
    figures = reliability.fuzz(server.url, API_KEY, cases=150)
    assert figures["operations"] >= 10 and figures["cases"] >= 40
    assert figures["server_errors"] == 0, figures["examples"]
    assert figures["leaked_pages"] == 0


@pytest.mark.parametrize("suppress", [False, True, ["x"]])
def test_every_form_of_suppress_is_accepted(server: ServerProcess, suppress: object) -> None:
    body = {"prompt": "q", "max_tokens": 1, "suppress": suppress}
    r = httpx.post(f"{server.url}/v1/jobs", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text


def test_churn_ends_every_job_as_asked_with_no_gap_and_no_leak(server: ServerProcess) -> None:
    """Read to done, hung up, deleted, dropped and resumed with Last-Event-ID: four at a time."""
    figures = reliability.churn(server.url, API_KEY, jobs=16, concurrency=4)
    assert figures["jobs"] == 16, figures["examples"]
    assert figures["server_errors"] == figures["gaps"] == figures["duplicates"] == 0, figures["examples"]
    assert figures["wrong_end"] == 0, figures["examples"]
    assert figures["leaked_pages"] == 0
    assert figures["health_polls"] > 0


def test_a_streaming_client_that_hangs_up_under_load_is_cancelled(server: ServerProcess) -> None:
    figures = reliability.hangup(server.url, API_KEY, hangups=2, load=2)
    assert figures["not_cancelled"] == 0
    assert figures["leaked_pages"] == 0
