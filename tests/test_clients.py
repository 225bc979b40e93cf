"""The Python client and the ``hogwild`` command against a real server process (tiny random model).

The server runs with an API key, so every test also proves that the key travels; one test proves that
without it the server refuses.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

from clients import Event, HogwildClient, HogwildError
from clients.cli import main
from clients.client import parse_sse
from tests.server_process import API_KEY

ENDED = ("finished", "cancelled", "failed")
SMALL: dict[str, Any] = {"workers": 2, "max_tokens": 24, "seed": 7}
LONG = 1000  # tokens per worker: a job that is still running when the test cancels it


@pytest.fixture
def client(server_url: str) -> Iterator[HogwildClient]:
    with HogwildClient(server_url, api_key=API_KEY) as c:
        yield c


def first_token(client: HogwildClient, job_id: str) -> Event:
    """Waits until the job is generating; closing the stream right after must not cancel it."""
    with closing(client.events(job_id)) as events:
        return next(ev for ev in events if ev.type == "token")


def check_stream(events: list[Event]) -> None:
    """Gap-free sequence numbers from 0 and exactly one ``done``, at the end."""
    assert [ev.id for ev in events] == list(range(len(events)))
    assert events[-1].type == "done"
    assert [ev.type for ev in events].count("done") == 1


# -- the SSE parser alone -------------------------------------------------------------------------------


def test_parse_sse_follows_the_event_stream_rules() -> None:
    lines = [
        ": keep-alive",
        "",
        "id: 0",
        "event: token",
        'data: {"a":',
        "data: 1}",
        "",
        "event:step",  # no space after the colon
        "data:{}",
        "",
        "retry: 100",  # unknown to us, ignored
        "",
        "id: 5",
        "data: x",  # no event name: "message"
        "",
        "event: cut",
        "data: never finished",  # no blank line: dropped
    ]
    assert list(parse_sse(lines)) == [("0", "token", '{"a":\n1}'), ("0", "step", "{}"), ("5", "message", "x")]


# -- the client against the server -----------------------------------------------------------------------


def test_submit_returns_the_job_object(client: HogwildClient) -> None:
    model = client.models()[0]["id"]
    job = client.submit("What is 2 + 2?", **SMALL)
    assert job["id"] and job["object"] == "job" and job["model"] == model
    assert job["status"] in ("queued", "prefill", "running", *ENDED)
    assert job["options"]["workers"] == 2 and job["options"]["max_tokens"] == 24
    assert [w["name"] for w in job["workers"]] == ["Alice", "Bob"]
    assert client.get(job["id"])["id"] == job["id"]
    assert job["id"] in [j["id"] for j in client.list()]


def test_events_rebuild_the_job(client: HogwildClient) -> None:
    """Everything a live view shows comes from events: they must add up to the job object."""
    job = client.submit("Count the primes below 30.", workers=3, max_tokens=32, quick_check_every=8, seed=3)
    events = list(client.events(job["id"]))
    check_stream(events)
    final = client.get(job["id"])
    assert final["status"] in ENDED

    texts = ["", "", ""]
    for ev in events:
        if ev.type == "token":
            texts[ev.data["worker"]] += ev.data["text"]
    assert texts == [w["text"] for w in final["workers"]]
    for w in final["workers"]:
        assert w["text"].startswith(f"**{w['name']} [1]:**")
    forced = "".join(ev.data["text"] for ev in events if ev.type == "token" and ev.data["forced"])
    assert "Hi, I'm Alice" in forced and "Hi, I'm Bob" in forced

    steps = [ev.data for ev in events if ev.type == "step"]
    assert steps, "the wired tiny model finishes steps"
    assert [(s["worker"], s["step"], s["text"]) for s in steps] == [
        (h["worker"], h["step"], h["text"]) for h in final["history"]
    ]
    checks = [ev.data for ev in events if ev.type == "quick_check"]
    assert checks, "quick_check_every=8 asks for quick checks"
    assert all("Quick check" in texts[c["worker"]] for c in checks)

    done = events[-1].data
    assert done["finish_reason"] == final["finish_reason"]
    assert done["usage"] == final["usage"]
    answers = [ev.data["answer"] for ev in events if ev.type == "final"]
    assert answers == ([final["answer"]] if final["answer"] is not None else [])


def test_reconnect_with_last_event_id_resumes_exactly(client: HogwildClient) -> None:
    job = client.run("Is 91 prime?", **SMALL)
    full = list(client.events(job["id"]))
    check_stream(full)
    for last in (0, len(full) // 2, len(full) - 2):
        assert list(client.events(job["id"], last_event_id=last)) == full[last + 1 :]


def test_run_streams_to_the_end(client: HogwildClient) -> None:
    seen: list[Event] = []
    job = client.run("What is 6 * 7?", on_event=lambda job, ev: seen.append(ev), **SMALL)
    assert job["status"] in ENDED and job["finish_reason"] == seen[-1].data["finish_reason"]
    check_stream(seen)


def test_cancel_ends_a_running_job(client: HogwildClient) -> None:
    job = client.submit("Write a very long essay.", workers=2, max_tokens=LONG)
    assert first_token(client, job["id"]).data["worker"] in (0, 1)
    cancelled = client.cancel(job["id"])
    assert cancelled["id"] == job["id"]
    events = list(client.events(job["id"]))
    check_stream(events)
    assert events[-1].data["finish_reason"] == "cancelled"
    ended = client.get(job["id"])
    assert ended["status"] == "cancelled" and ended["finish_reason"] == "cancelled"


def test_list_is_newest_first(client: HogwildClient) -> None:
    a = client.run("First.", **SMALL)
    b = client.run("Second.", **SMALL)
    ids = [j["id"] for j in client.list()]
    assert ids.index(b["id"]) < ids.index(a["id"])


def test_errors_carry_status_and_message(client: HogwildClient, server_url: str) -> None:
    with pytest.raises(HogwildError) as missing:
        client.get("job-does-not-exist")
    assert missing.value.status == 404
    with pytest.raises(HogwildError) as cancel_missing:
        client.cancel("job-does-not-exist")
    assert cancel_missing.value.status == 404
    with pytest.raises(HogwildError) as stream_missing:
        next(client.events("job-does-not-exist"))
    assert stream_missing.value.status == 404
    with pytest.raises(HogwildError) as invalid:
        client.submit("Hi", workers=0)
    assert invalid.value.status == 422 and invalid.value.field == "workers"
    assert "workers" in invalid.value.message
    with HogwildClient(server_url) as anonymous, pytest.raises(HogwildError) as refused:
        anonymous.list()
    assert refused.value.status == 401
    with HogwildClient("http://127.0.0.1:9", api_key=API_KEY) as nowhere, pytest.raises(HogwildError) as down:
        nowhere.list()
    assert down.value.status == 0


# -- the command line -----------------------------------------------------------------------------------


def cli(server_url: str, *args: str) -> list[str]:
    return [*args, "--url", server_url, "--api-key", API_KEY]


@pytest.mark.parametrize("view", ["--columns", "--stream"])
def test_cli_solves_and_prints_the_answer(
    server_url: str, client: HogwildClient, view: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(cli(server_url, "What is 3 + 4?", "--workers", "2", "--max-tokens", "16", view))
    out = capsys.readouterr().out
    job = client.list()[0]
    assert code == (0 if job["status"] == "finished" else 1)
    assert job["id"] in out and "answer:" in out and f"({job['finish_reason']})" in out
    if view == "--columns":  # the last frame of the live panels stays on screen
        assert "Alice" in out and "Bob" in out and "tok/s" in out
    if view == "--stream":  # finished steps are printed as they happen
        assert all(h["text"].strip().splitlines()[0] in out for h in job["history"])


def test_cli_json_commands(
    server_url: str, client: HogwildClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(cli(server_url, "What is 1 + 1?", "--max-tokens", "8", "--workers", "2", "--json")) in (0, 1)
    ran = json.loads(capsys.readouterr().out)
    assert ran["status"] in ENDED and ran["options"]["max_tokens"] == 8

    assert main(cli(server_url, "get", ran["id"], "--json")) == 0
    assert json.loads(capsys.readouterr().out) == client.get(ran["id"])

    assert main(cli(server_url, "jobs", "--json")) == 0
    assert json.loads(capsys.readouterr().out)[0]["id"] == ran["id"]

    job = client.submit("Write a very long essay.", workers=2, max_tokens=LONG)
    assert main(cli(server_url, "cancel", job["id"], "--json")) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job["id"]
    assert list(client.events(job["id"]))[-1].data["finish_reason"] == "cancelled"


def test_cli_tables_and_errors(
    server_url: str, client: HogwildClient, capsys: pytest.CaptureFixture[str]
) -> None:
    job = client.run("What is 5 - 3?", **SMALL)
    assert main(cli(server_url, "jobs")) == 0
    assert job["id"] in capsys.readouterr().out
    assert main(cli(server_url, "get", job["id"])) == 0
    out = capsys.readouterr().out
    assert "Alice" in out and "Bob" in out and "answer:" in out
    assert main(cli(server_url, "get", "job-does-not-exist")) == 1
    assert "404" in capsys.readouterr().err


# -- the live columns, rendered in a terminal of fixed size ----------------------------------------------

BORDERS = "╭╮╰╯│"


def panels(frame: str) -> list[tuple[str, str]]:
    """Each panel of a rendered frame in reading order: its title, and its text inside the borders."""
    lines = frame.splitlines()
    found = []
    for top, line in enumerate(lines):
        lefts = [x for x, c in enumerate(line) if c == "╭"]
        rights = [x for x, c in enumerate(line) if c == "╮"]
        for left, right in zip(lefts, rights, strict=True):
            title = line[left + 1 : right].strip("─ ")
            body = []
            for inner in lines[top + 1 :]:
                if inner[left] == "╰":
                    break
                body.append(inner[left + 1 : right])
            found.append((title, "\n".join(body)))
    return found


@pytest.mark.parametrize(("width", "height", "workers"), [(150, 40, 3), (80, 24, 5)])
def test_live_columns_stay_put_and_wrap_every_worker_whole(width: int, height: int, workers: int) -> None:
    """The issue: 3 workers at 150 columns were laid out 2 + 1 with the third cut to "...", then 3
    across, then stacked, as rich's Columns re-measured the growing texts. Every frame now has the same
    borders in the same places, and each worker's latest text shows whole, wrapped in its own column."""
    import io

    from rich.console import Console

    from clients.cli import Watch

    console = Console(width=width, height=height, file=io.StringIO(), color_system=None)
    names = [f"W{i}" for i in range(workers)]
    job = {"options": {"workers": workers}, "workers": [{"index": i, "name": n} for i, n in enumerate(names)]}
    watch = Watch(job, console, "columns")
    words = ["Let", "us", "think", "step", "by", "step:\n", "17 * 23 =", "391", "x" * 70, "done.\n\n"]
    texts = [""] * workers
    layouts = []
    for i in range(300):
        w = (i * i) % workers if i % 3 else 0  # uneven speeds: worker 0 writes the most
        text = words[(i + w) % len(words)] + " "
        texts[w] += text
        watch.handle(Event(i, "token", {"worker": w, "text": text, "forced": i % 13 == 0}))
        with console.capture() as capture:
            console.print(watch)
        frame = capture.get()
        assert "…" not in frame and "..." not in frame, frame
        assert len(frame.splitlines()) < height, frame  # Live would crop a taller frame to "..."
        layouts.append([[x for x, c in enumerate(line) if c in BORDERS] for line in frame.splitlines()])
        shown = panels(frame)
        assert [title for title, _ in shown] == names, frame
        for (_, body), written in zip(shown, texts, strict=True):
            tail = "".join(written.split())[-30:]  # the latest text, wrapped however it fits
            assert "".join(body.split()).endswith(tail), (tail, frame)
    assert all(layout == layouts[0] for layout in layouts), "the columns moved"
    edges = sorted({x for line in layouts[0] for x in line})
    assert edges[0] == 0 and edges[-1] == width - 1  # the terminal's width, split among the workers
