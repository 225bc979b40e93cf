"""The dashboard in headless Chromium against a real server: submit, watch, replay, cancel, errors.

Needs Debian's chromium (``apt-get install chromium fonts-liberation``) and pytest-playwright; the
browser Playwright would download is never used. Without them the tests are skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("playwright")

from playwright.sync_api import Page, expect

from clients import HogwildClient
from tests.server_process import API_KEY

CHROMIUM = Path("/usr/bin/chromium")
# Where the live-job screenshot goes: ``HOGWILD_SCREENSHOT=docs/dashboard.png`` refreshes the README's.
SCREENSHOT = os.environ.get("HOGWILD_SCREENSHOT")
JOB_S = 120_000  # ms: a hang guard for one job on the tiny model, not a speed requirement

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM)}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    return {**browser_context_args, "viewport": {"width": 1400, "height": 1000}}


@pytest.fixture
def client(server_url: str) -> Iterator[HogwildClient]:
    with HogwildClient(server_url, api_key=API_KEY) as c:
        yield c


@pytest.fixture
def dashboard(page: Page, server_url: str) -> Iterator[Page]:
    """The page, opened with the API key entered; any script error fails the test."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server_url}/")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    yield page
    assert errors == []


def submit(page: Page, prompt: str, workers: int, max_tokens: int, quick_check_every: str = "") -> str:
    page.fill("#prompt", prompt)
    page.fill("#workers", str(workers))
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#quick_check_every", quick_check_every)
    page.click("#submit")
    expect(page.locator("#job-id")).not_to_be_empty()
    return str(page.locator("#job-id").text_content())


def wait_done(page: Page) -> None:
    expect(page.locator("#done .reason")).to_be_visible(timeout=JOB_S)


def check_matches_job(page: Page, job: dict[str, Any]) -> None:
    """What the page built from events is what the server says the job is."""
    assert page.locator(".worker-name").all_text_contents() == [w["name"] for w in job["workers"]]
    assert page.locator(".worker-text").all_text_contents() == [w["text"] for w in job["workers"]]
    for w in job["workers"]:
        forced = page.locator(f'.worker[data-worker="{w["index"]}"] .forced').first
        expect(forced).to_contain_text(f"Hi, I'm {w['name']}")
    steps = page.locator("#history .step .step-text").all_text_contents()
    assert steps == [h["text"].strip() for h in job["history"]]
    expect(page.locator("#done .reason")).to_have_text(job["finish_reason"])
    expect(page.locator("#answer")).to_have_text(job["answer"] if job["answer"] is not None else "(none)")
    expect(page.locator("#job-status")).to_have_text(job["status"])


def test_dashboard_runs_and_replays_a_job(dashboard: Page, client: HogwildClient) -> None:
    page = dashboard
    expect(page.locator("#model")).to_have_text(client.models()[0]["id"])
    prompt = "What is 17 * 23? Think step by step."
    job_id = submit(page, prompt, workers=3, max_tokens=40, quick_check_every="8")
    expect(page.locator("#job-prompt")).to_have_text(prompt)
    expect(page.locator(".worker")).to_have_count(3)
    page.wait_for_function(
        "[...document.querySelectorAll('.worker-text')].filter((n) => n.textContent.length > 0).length >= 2",
        timeout=JOB_S,
    )
    wait_done(page)
    job = client.get(job_id)
    check_matches_job(page, job)
    assert job["history"], "the wired tiny model finishes steps"
    checks = [ev for ev in client.events(job_id) if ev.type == "quick_check"]
    assert checks and page.locator("#history .check").count() == len(checks)
    for stats in page.locator(".worker-stats").all_text_contents():
        assert "tok/s" in stats  # a live job shows its speed per worker
    expect(page.locator("#jobs li").first).to_have_attribute("data-id", job_id)
    # The engine's line: its load and the share of prompt tokens read from the prefix cache.
    expect(page.locator("#engine-stats")).to_have_text(
        re.compile(r"\d+ running · \d+ queued · prefix cache \d+% hit")
    )
    expect(page.locator("#done")).to_contain_text("cached")
    shot = page.screenshot(path=SCREENSHOT, full_page=True)
    assert shot.startswith(b"\x89PNG")

    # A fresh page replays the ended job from its event stream, without speeds (they would be the replay's).
    page.goto(page.url.split("#")[0])
    page.click(f'#jobs li[data-id="{job_id}"] button')
    wait_done(page)
    check_matches_job(page, job)
    for stats in page.locator(".worker-stats").all_text_contents():
        assert "tok/s" not in stats


def test_dashboard_cancels_a_running_job(dashboard: Page, client: HogwildClient) -> None:
    page = dashboard
    job_id = submit(page, "Write a very long essay.", workers=2, max_tokens=1000)
    page.wait_for_function("document.querySelector('.worker-text').textContent.length > 0", timeout=JOB_S)
    page.click("#cancel")
    wait_done(page)
    expect(page.locator("#done .reason")).to_have_text("cancelled")
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
    assert client.get(job_id)["status"] == "cancelled"


def test_dashboard_shows_errors(dashboard: Page, server_url: str) -> None:
    page = dashboard
    page.fill("#prompt", "Hi")
    page.fill("#workers", "0")
    page.click("#submit")
    expect(page.locator("#form-error")).to_contain_text("422")
    expect(page.locator("#workers")).to_have_class(re.compile(r"\binvalid\b"))

    page.goto(f"{server_url}/#job-does-not-exist")
    expect(page.locator("#job-error")).to_contain_text("job-does-not-exist")
    expect(page.locator("#job-error")).to_contain_text("404")

    # Without the key the server refuses, and the page says so instead of failing silently.
    page.fill("#api-key", "")
    page.press("#api-key", "Enter")
    expect(page.locator("#model")).to_have_text("API key needed")
    page.fill("#workers", "2")
    page.click("#submit")
    expect(page.locator("#form-error")).to_contain_text("401")
