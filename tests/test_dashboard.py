"""The dashboard in headless Chromium against a real server: submit, watch, replay, cancel, errors, on a
desktop's window and a phone's.

Needs Debian's chromium (``apt-get install chromium fonts-liberation``) and pytest-playwright; the
browser Playwright would download is never used. Without them the tests are skipped. Screenshots of the
live job at both sizes go to pytest's tmp dir (docs/dashboard*.png are taken with the embedded model).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("playwright")

from playwright.sync_api import Page, Route, ViewportSize, expect

from clients import HogwildClient
from tests.server_process import API_KEY

CHROMIUM = Path("/usr/bin/chromium")
JOB_S = 120_000  # ms: a hang guard for one job on the tiny model, not a speed requirement
DESKTOP = ViewportSize(width=1440, height=900)
PHONE = ViewportSize(width=390, height=844)
NARROWEST = ViewportSize(width=360, height=740)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM)}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    return {**browser_context_args, "viewport": DESKTOP}


@pytest.fixture
def client(server_url: str) -> Iterator[HogwildClient]:
    with HogwildClient(server_url, api_key=API_KEY) as c:
        yield c


def open_dashboard(page: Page, server_url: str) -> list[str]:
    """Open the page and enter the API key; the list collects script errors, which fail the test."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server_url}/")
    page.fill("#api-key", API_KEY)
    page.press("#api-key", "Enter")
    return errors


@pytest.fixture
def dashboard(page: Page, server_url: str) -> Iterator[Page]:
    errors = open_dashboard(page, server_url)
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


def check_fits(page: Page) -> None:
    """Nothing is wider than the window, and the API key box lies inside its first screen."""
    fit = page.evaluate(
        """() => {
            const key = document.getElementById("api-key").getBoundingClientRect();
            return {scroll: document.documentElement.scrollWidth, width: innerWidth, height: innerHeight,
                    key: [key.left, key.top + scrollY, key.right, key.bottom + scrollY]};
        }"""
    )
    assert fit["scroll"] <= fit["width"], fit
    left, top, right, bottom = fit["key"]
    assert 0 <= left < right <= fit["width"] and 0 <= top < bottom <= fit["height"], fit


def worker_boxes(page: Page) -> list[dict[str, float]]:
    boxes: list[dict[str, float]] = page.evaluate(
        "[...document.querySelectorAll('.worker')].map((n) => n.getBoundingClientRect().toJSON())"
    )
    return boxes


def check_workers_on_screen(page: Page) -> None:
    """Right after submitting, the first worker's panel starts on the screen: no scrolling to find it."""
    top = worker_boxes(page)[0]["top"]
    assert 0 <= top < 0.75 * page.evaluate("innerHeight"), top


def clock(seconds: float) -> str:
    """The dashboard's way of writing a duration."""
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


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
    expect(page.locator(f'#jobs li[data-id="{job["id"]}"] .status')).to_have_text(job["status"])
    # The clock stops on the server's duration; speeds are generated tokens over it, live or replayed.
    seconds = job["timings"]["duration_s"]
    expect(page.locator("#job-clock")).to_have_text(f"took {clock(seconds)}")
    total = sum(w["generated"] for w in job["workers"])
    expect(page.locator("#job-speed")).to_have_text(f"{total / seconds:.1f} tok/s in all")
    expect(page.locator(".worker-stats")).to_have_text(
        [f"{w['generated']} tok · {w['generated'] / seconds:.1f} tok/s" for w in job["workers"]]
    )


CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "  Name a prime\n   number.  "},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another one?"},
]


def test_dashboard_runs_and_replays_a_job(
    dashboard: Page, client: HogwildClient, server_url: str, tmp_path: Path
) -> None:
    page = dashboard
    expect(page.locator("#model")).to_have_text(client.models()[0]["id"])
    # A job sent through the OpenAI route is listed by its first user message, not by its id.
    reply = httpx.post(
        f"{server_url}/v1/chat/completions",
        json={"messages": CHAT, "max_tokens": 4},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=JOB_S / 1000,
    )
    assert reply.status_code == 200, reply.text
    chat_id = next(j["id"] for j in client.list() if j["prompt"] == CHAT)
    check_fits(page)

    prompt = "What is 17 * 23? Think step by step."
    job_id = submit(page, prompt, workers=3, max_tokens=40, quick_check_every="8")
    check_workers_on_screen(page)
    expect(page.locator("#job-prompt")).to_have_text(prompt)
    expect(page.locator(".worker")).to_have_count(3)
    expect(page.locator(f'#jobs li[data-id="{chat_id}"] .job-prompt')).to_have_text("Name a prime number.")
    # The legend shows forced text the way the workers' texts do.
    legend = page.locator(".legend .forced")
    expect(legend).to_be_visible()
    expect(page.locator(".legend")).to_contain_text("engine inserted")
    page.wait_for_function(
        "[...document.querySelectorAll('.worker-text')].filter((n) => n.textContent.length > 0).length >= 2",
        timeout=JOB_S,
    )
    wait_done(page)
    style = "(n) => getComputedStyle(n).fontWeight + ' ' + getComputedStyle(n).backgroundColor"
    forced = page.locator('.worker[data-worker="0"] .forced').first
    assert legend.evaluate(style) == forced.evaluate(style)
    job = client.get(job_id)
    check_matches_job(page, job)
    assert job["history"], "the wired tiny model finishes steps"
    checks = [ev for ev in client.events(job_id) if ev.type == "quick_check"]
    assert checks and page.locator("#history .check").count() == len(checks)
    expect(page.locator("#jobs li").first).to_have_attribute("data-id", job_id)
    # The engine's line: its load and the share of prompt tokens read from the prefix cache.
    expect(page.locator("#engine-stats")).to_have_text(
        re.compile(r"\d+ running · \d+ queued · prefix cache \d+% hit")
    )
    expect(page.locator("#done")).to_contain_text("cached")
    check_fits(page)
    page.screenshot(path=tmp_path / "dashboard.png", full_page=True)

    # A fresh page replays the ended job from its event stream, with the speeds and time it had live.
    page.goto(page.url.split("#")[0])
    page.click(f'#jobs li[data-id="{job_id}"] button')
    wait_done(page)
    check_matches_job(page, job)


def test_dashboard_on_a_phone(page: Page, client: HogwildClient, server_url: str, tmp_path: Path) -> None:
    """One column on a phone's screen; and a page opened while the engine loads finds its model later."""
    ready = False

    def models(route: Route) -> None:  # the server as it answers before the engine is up
        if ready:
            route.continue_()
        else:
            route.fulfill(status=503, json={"error": {"message": "the engine is starting", "code": 503}})

    page.set_viewport_size(PHONE)
    page.route("**/v1/models", models)
    errors = open_dashboard(page, server_url)
    expect(page.locator("#model")).to_have_text("model loading…")
    ready = True
    expect(page.locator("#model")).to_have_text(client.models()[0]["id"], timeout=15_000)
    check_fits(page)

    job_id = submit(page, "What is 17 * 23?", workers=3, max_tokens=24)
    check_workers_on_screen(page)
    boxes = worker_boxes(page)
    assert len({round(b["left"]) for b in boxes}) == 1, boxes  # stacked in one column
    assert boxes[0]["bottom"] <= boxes[1]["top"], boxes
    wait_done(page)
    check_matches_job(page, client.get(job_id))
    check_fits(page)
    page.screenshot(path=tmp_path / "dashboard-phone.png", full_page=True)
    page.set_viewport_size(NARROWEST)
    check_fits(page)
    assert errors == []


def test_dashboard_cancels_a_running_job(dashboard: Page, client: HogwildClient) -> None:
    page = dashboard
    job_id = submit(page, "Write a very long essay.", workers=2, max_tokens=1000)
    page.wait_for_function("document.querySelector('.worker-text').textContent.length > 0", timeout=JOB_S)
    # While it runs, the job list says so, the clock ticks, and the total speed is shown.
    expect(page.locator(f'#jobs li[data-id="{job_id}"] .status')).to_have_text("running")
    expect(page.locator("#job-clock")).to_have_text(re.compile(r"^elapsed \d+\.\d s$"))
    expect(page.locator("#job-speed")).to_have_text(re.compile(r"^\d+\.\d tok/s in all$"))
    shown = page.locator("#job-clock").text_content()
    page.wait_for_function(f"document.getElementById('job-clock').textContent !== {shown!r}")
    page.click("#cancel")
    wait_done(page)
    expect(page.locator("#done .reason")).to_have_text("cancelled")
    expect(page.locator("#job-status")).to_have_text("cancelled")
    expect(page.locator(f'#jobs li[data-id="{job_id}"] .status')).to_have_text("cancelled")
    expect(page.locator("#job-clock")).to_have_text(re.compile(r"^took "))
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
