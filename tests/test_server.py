"""The HTTP server as users meet it: a real process, real HTTP (httpx and the official openai package)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine.protocol import EngineOptions, JobOptions
from server.schemas import ChatRequest, CompletionRequest, JobRequest
from server.settings import Settings
from tests.server_process import API_KEY, ServerProcess, running_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
WAIT_S = 120.0  # hang guard for a job or a state change; never a speed requirement


def api(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers=AUTH, timeout=60)


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with api(server) as client:
        yield client


def sse(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Parse an event stream into {id, event, data} records (comments dropped)."""
    record: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in record:
                yield record
            record = {}
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            record[key] = json.loads(value) if key == "data" and value.startswith(("{", "[")) else value


def events_of(http: httpx.Client, job_id: str, last: int | None = None) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": str(last)} if last is not None else {}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200
        return list(sse(r))


def wait_for(http: httpx.Client, job_id: str, statuses: tuple[str, ...]) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {statuses}")


def submit(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/jobs", json={"prompt": "What is 6 * 7?", **body})
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_operations_endpoints(server: ServerProcess) -> None:
    health = httpx.get(f"{server.url}/health").json()
    assert health == {"status": "ok", "engines": [{"engine": 0, "state": "ready"}]}
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["status"] == "ready" and ready["model"]
    [engine] = ready["engines"]
    assert engine["state"] == "ready" and engine["pid"] == server.engine_pid() and engine["reason"] is None
    models = httpx.get(f"{server.url}/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == ready["model"]


def test_a_job_streams_events_that_rebuild_its_state(http: httpx.Client) -> None:
    r = http.post("/v1/jobs", json={"prompt": "What is 6 * 7?", "workers": 3, "max_tokens": 24, "seed": 3})
    assert r.status_code == 201 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = r.json()
    assert [w["name"] for w in job["workers"]] == ["Alice", "Bob", "Carol"]
    assert job["prompt"] == "What is 6 * 7?"
    events = events_of(http, job["id"])
    assert [int(e["id"]) for e in events] == list(range(len(events)))
    assert events[-1]["event"] == "done" and sum(e["event"] == "done" for e in events) == 1
    final = http.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "finished"
    texts = ["", "", ""]
    counts = [0, 0, 0]
    for e in events:
        if e["event"] == "token":
            d = e["data"]
            assert d["index"] == counts[d["worker"]]  # per-worker token index without gaps
            counts[d["worker"]] += 1
            texts[d["worker"]] += d["text"]
            assert set(d) == {"worker", "text", "token_id", "index", "step", "forced", "finisher"}
    assert texts == [w["text"] for w in final["workers"]]
    assert counts == [w["tokens"] for w in final["workers"]]
    steps = [e["data"] for e in events if e["event"] == "step"]
    assert [(s["worker"], s["step"], s["text"]) for s in steps] == [
        (h["worker"], h["step"], h["text"]) for h in final["history"]
    ]
    done = events[-1]["data"]
    assert done["finish_reason"] == final["finish_reason"]
    assert done["usage"] == final["usage"] and done["usage"]["completion_tokens"] > 0
    assert final["timings"]["ttft_s"] > 0 and final["timings"]["duration_s"] >= final["timings"]["ttft_s"]


def test_last_event_id_resumes_exactly_and_ended_jobs_replay(http: httpx.Client) -> None:
    job = submit(http, max_tokens=16)
    full = events_of(http, job["id"])  # opened live, ends with the job
    assert len(full) > 10
    cut = len(full) // 2
    rest = events_of(http, job["id"], last=cut - 1)
    assert rest == full[cut:]
    assert events_of(http, job["id"]) == full  # a replay of the ended job, then the stream closes
    assert events_of(http, job["id"], last=len(full) - 1) == []
    assert events_of(http, job["id"], last=-5) == full  # before the first event: everything, once


def test_post_with_stream_answers_with_the_stream(http: httpx.Client) -> None:
    body = {"prompt": "Hi", "max_tokens": 8}
    with http.stream("POST", "/v1/jobs", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        job_id = r.headers["x-job-id"]
        events = list(sse(r))
    assert events[-1]["event"] == "done"
    with http.stream("POST", "/v1/jobs", json=body, headers={"Accept": "text/event-stream"}) as r:
        assert [e["event"] for e in sse(r)][-1] == "done"
    assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "finished"


def test_a_streaming_client_that_hangs_up_cancels_its_job_unless_detached(http: httpx.Client) -> None:
    ids = {}
    for detach in (False, True):
        body = {"prompt": "Count slowly.", "max_tokens": 1000, "stream": True, "detach": detach}
        with http.stream("POST", "/v1/jobs", json=body) as r:
            ids[detach] = r.headers["x-job-id"]
            next(sse(r))  # hang up after the first event
    cancelled = wait_for(http, ids[False], ("cancelled",))
    assert cancelled["finish_reason"] == "cancelled"
    assert http.get(f"/v1/jobs/{ids[True]}").json()["status"] in ("queued", "running")
    deleted = http.delete(f"/v1/jobs/{ids[True]}")
    assert deleted.status_code == 200 and deleted.json()["status"] == "cancelled"
    assert events_of(http, ids[True])[-1]["data"]["finish_reason"] == "cancelled"


def test_a_chat_client_that_hangs_up_without_streaming_cancels_its_job(http: httpx.Client) -> None:
    """The job kept generating to its end while its tokens kept coming: the hang-up was looked for only
    after a second without any."""
    # No paragraph breaks (so no step headers) and no end of text: both workers write all 1,500 tokens.
    body = {"messages": [{"role": "user", "content": "Count slowly."}], "max_tokens": 1500, "workers": 2}
    body.update(quick_check_every=0, finisher=False, instructions="none")
    body["suppress"] = ["\u010a", "<|im_end|>", "<|endoftext|>"]  # byte-level newline, the model's ends
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after half a second and hangs up
        http.post("/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    job = http.get("/v1/jobs", params={"limit": 1}).json()["data"][0]
    assert job["prompt"] == body["messages"]
    ended = wait_for(http, job["id"], ("cancelled", "finished"))
    assert ended["status"] == "cancelled", ended["usage"]
    assert ended["usage"]["completion_tokens"] < 2 * 1500


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"workers": "many"}, 422, "workers"),
        ({"workers": "2"}, 422, "workers"),  # no lax coercion on the jobs API
        ({"workers": True}, 422, "workers"),
        ({"stream": "yes"}, 422, "stream"),
        ({"workers": 99}, 422, "workers"),
        ({"layout": "spiral"}, 422, "layout"),
        ({"top_p": 0}, 422, "top_p"),
        ({"colour": "red"}, 422, "colour"),
        ({"prompt": None}, 422, "prompt"),  # neither prompt nor messages
        ({"messages": [{"role": "user", "content": "hi"}]}, 422, "prompt"),  # prompt and messages both
        ({"prompt": None, "messages": []}, 422, "messages"),
        ({"int": 1}, 422, "int"),  # an unknown field named like a union member is still named
        ({"messages": [{"role": "robot", "content": "hi"}], "prompt": None}, 422, "messages.0.role"),
        ({"prompt": "long " * 3000, "workers": 4, "max_tokens": 500}, 413, "prompt"),
        ({"workers": 10**30}, 422, "workers"),  # refused before anything is built per worker
        ({"max_tokens": 10**30}, 422, "max_tokens"),
        ({"seed": 2**64}, 422, "seed"),
        ({"stop": [1, 2]}, 422, "stop"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field(
    http: httpx.Client, body: dict[str, Any], status: int, field: str | None
) -> None:
    r = http.post("/v1/jobs", json={"prompt": "q", **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field and error["message"]


def test_malformed_requests(http: httpx.Client, server: ServerProcess) -> None:
    json_type = {"content-type": "application/json"}
    r = http.post("/v1/jobs", content=b"{not json", headers=json_type)
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    r = http.post("/v1/jobs", content=b"[1, 2]", headers=json_type)
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    for value in (b"NaN", b"Infinity"):  # Python's JSON parser accepts them; sampling must not see them
        r = http.post(
            "/v1/jobs", content=b'{"prompt": "hi", "temperature": ' + value + b"}", headers=json_type
        )
        assert r.status_code == 422 and r.json()["error"]["field"] == "temperature"
    r = http.post("/v1/jobs", content=b"x" * 2_000_000, headers=json_type)
    assert r.status_code == 413
    chunked = (b"x" * 100_000 for _ in range(20))  # no Content-Length: counted as it arrives
    assert http.post("/v1/jobs", content=chunked, headers=json_type).status_code == 413
    assert http.get("/v1/jobs", params={"limit": -1}).status_code == 422
    r = http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # OpenAI's status and shape
    assert http.get("/v1/jobs/job-nope").status_code == 404
    assert http.delete("/v1/jobs/job-nope").status_code == 404
    assert http.get("/v1/jobs/job-nope/events").status_code == 404
    assert httpx.get(f"{server.url}/v1/jobs").status_code == 401  # no key
    assert httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server.url}/v1/jobs", cookies={"hogwild_key": API_KEY}).status_code == 200


def metric_values(server: ServerProcess) -> dict[str, float]:
    """Every series by its name and labels; a family labelled by engine alone also summed under its name."""
    text = httpx.get(f"{server.url}/metrics").text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.split(" ")[0], float(line.split(" ")[1])
            values[key] = value
            name, _, labels = key.partition("{")
            if labels.startswith('engine="') and labels.count("=") == 1:
                values[name] = values.get(name, 0.0) + value
    return values


def test_a_repeated_prompt_reads_its_prefix_from_the_cache(http: httpx.Client, server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    model = client.models.list().data[0].id
    messages: Any = [{"role": "user", "content": "Cache this: what is 12 times 13?"}]
    body: Any = dict(model=model, messages=messages, max_tokens=4, extra_body={"workers": 2})
    replies = [client.chat.completions.create(**body) for _ in range(2)]
    usage = replies[1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    assert 0 < cached < usage.prompt_tokens  # every full page but the one the prompt ends in
    stats = http.get("/v1/stats").json()
    assert stats["prefix_cache"] is True and stats["prefix_cache_hits"] >= cached
    assert 0 < stats["prefix_cache_hit_rate"] <= 1 and stats["evictable_pages"] > 0
    values = metric_values(server)
    assert values["hogwild_prefix_cache_hits_total"] >= cached
    assert values["hogwild_prefix_cache_queries_total"] >= values["hogwild_prefix_cache_hits_total"]
    assert values["hogwild_pool_pages_evictable"] > 0
    assert httpx.get(f"{server.url}/v1/stats").status_code == 401  # no key


def test_jobs_list_and_metrics(http: httpx.Client, server: ServerProcess) -> None:
    job = submit(http, max_tokens=8)
    wait_for(http, job["id"], ("finished",))
    listed = http.get("/v1/jobs").json()["data"]
    assert listed[0]["id"] == job["id"]
    values = metric_values(server)
    assert values["hogwild_tokens_generated_total"] > 0
    assert values["hogwild_time_to_first_token_seconds_count"] > 0
    assert values["hogwild_inter_token_latency_seconds_count"] > 0
    assert values["hogwild_step_latency_seconds_count"] > 0
    assert values["hogwild_engine_up"] == 1
    assert values["hogwild_pool_pages_total"] > 0
    assert values["hogwild_engine_graph_replays"] == 0  # CUDA graphs exist only on a GPU
    assert values['hogwild_jobs_total{finish_reason="length"}'] >= 1
    # What Prometheus users of vLLM look for: job latency and queue time, prompt tokens, KV usage, model.
    assert values["hogwild_e2e_job_latency_seconds_count"] >= 1
    assert values["hogwild_job_queue_time_seconds_count"] >= 1
    prompt_tokens = http.get(f"/v1/jobs/{job['id']}").json()["usage"]["prompt_tokens"]
    assert values["hogwild_prompt_tokens_total"] >= prompt_tokens > 0
    assert 0 <= values["hogwild_kv_cache_usage_ratio"] <= 1
    model = http.get("/v1/models").json()["data"][0]["id"]
    info = [k for k in values if k.startswith("hogwild_model_info{") and f'model_name="{model}"' in k]
    assert len(info) == 1 and values[info[0]] == 1 and 'device="cpu"' in info[0], info


def test_the_official_openai_client_works_unchanged(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        max_tokens=12,
        temperature=0,
        extra_body={"workers": 3, "layout": "interleaved"},
    )
    choice = reply.choices[0]
    extra = choice.message.model_extra or {}
    assert all(f"[{name}]" in extra["reasoning_content"] for name in ("Alice", "Bob", "Carol"))
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"workers": 2},
    )
    chunks = list(stream)
    workers = {(c.choices[0].delta.model_extra or {}).get("worker_name") for c in chunks if c.choices}
    assert {"Alice", "Bob"} <= workers
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])


def test_a_full_queue_answers_429_and_waiting_streams_keep_alive(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    flags = ("--max-running-jobs", "1", "--max-queued-jobs", "1", "--keepalive-s", "0.2")
    with running_server(tiny_model_dir, tmp_path, *flags) as server, api(server) as http:
        body = {"prompt": "Count.", "max_tokens": 1000, "quick_check_every": 0}
        running, queued, full = (http.post("/v1/jobs", json=body) for _ in range(3))
        assert full.status_code == 429, (http.get(f"/v1/jobs/{running.json()['id']}").text, full.text)
        assert int(full.headers["retry-after"]) > 0
        assert "queue is full" in full.json()["error"]["message"]
        # The queued job says nothing until the running one ends: its stream carries keep-alive comments.
        with http.stream("GET", f"/v1/jobs/{queued.json()['id']}/events") as r:
            first = next(line for line in r.iter_lines() if line)
        assert first == ": keep-alive"
        for job in (running, queued):
            assert http.delete(f"/v1/jobs/{job.json()['id']}").json()["status"] == "cancelled"


def test_engine_death_is_reported_open_streams_end_and_the_engine_restarts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with running_server(tiny_model_dir, tmp_path) as server, api(server) as http:
        job = submit(http, max_tokens=1000)
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
            stream = sse(r)
            next(stream)
            os.kill(server.engine_pid(), signal.SIGKILL)
            rest = list(stream)
        assert [e["event"] for e in rest[-2:]] == ["error", "done"]
        assert "SIGKILL" in rest[-2]["data"]["message"]
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "failed"
        ready = httpx.get(f"{server.url}/ready")  # a new engine needs seconds to load its model
        assert ready.status_code == 503 and "SIGKILL" in ready.json()["reason"]
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert http.post("/v1/jobs", json={"prompt": "q"}).status_code == 503
        deadline = time.monotonic() + WAIT_S
        while httpx.get(f"{server.url}/ready").status_code != 200:
            assert time.monotonic() < deadline, "the engine was not restarted"
            time.sleep(0.2)
        again = submit(http, max_tokens=8)
        assert wait_for(http, again["id"], ("finished",))["usage"]["completion_tokens"] > 0
        assert "hogwild_engine_restarts_total 1.0" in httpx.get(f"{server.url}/metrics").text


def test_sigterm_ends_open_streams_with_done_and_exits(tiny_model_dir: Path, tmp_path: Path) -> None:
    body = {"prompt": "Count.", "max_tokens": 1000, "stream": True}
    with running_server(tiny_model_dir, tmp_path) as server:
        with api(server) as http, http.stream("POST", "/v1/jobs", json=body) as r:
            stream = sse(r)
            next(stream)
            server.process.send_signal(signal.SIGTERM)
            rest = list(stream)
        assert rest[-1]["event"] == "done" and rest[-1]["data"]["finish_reason"] == "cancelled"
        assert server.process.wait(timeout=WAIT_S) == 0  # a graceful drain is a clean exit
        assert "Application shutdown complete" in server.log.read_text()


def test_every_job_option_is_a_field_of_both_request_bodies() -> None:
    """A job option is added once, in JobOptions: both routes take exactly those (trace is the engine's),
    with the same defaults."""
    options = {f.name for f in dataclasses.fields(JobOptions)} - {"trace"}
    jobs = set(JobRequest.model_fields) - {"prompt", "messages", "stream", "detach"}
    openai = {"model", "n", "stream", "stream_options"}
    chat = set(ChatRequest.model_fields) - openai - {"messages", "max_completion_tokens", "top_logprobs"}
    completion = set(CompletionRequest.model_fields) - openai - {"prompt", "echo", "suffix", "best_of"}
    assert jobs == options
    assert chat == options
    assert completion == options
    defaults = JobOptions()
    for name in options:
        given = JobRequest.model_fields[name].default
        assert given is None or given == getattr(defaults, name), name


def test_logit_bias_works_on_both_routes(http: httpx.Client, server: ServerProcess, tok: Any) -> None:
    """OpenAI's semantics: +100 makes a token certain, on the jobs API and on the chat route alike."""
    token = tok.encode(" hello", add_special_tokens=False)[0]
    job = submit(http, workers=1, max_tokens=3, finisher=False, logit_bias={str(token): 100})
    wait_for(http, job["id"], ("finished",))
    ids = [ev["data"]["token_id"] for ev in events_of(http, job["id"]) if ev["event"] == "token"]
    assert ids[-3:] == [token] * 3, ids
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "Say anything."}],
        max_tokens=2,
        logit_bias={str(token): 100},
        extra_body={"workers": 1, "finisher": False},
    )
    text = (reply.choices[0].message.model_extra or {})["reasoning_content"]
    assert text.endswith(tok.decode([token, token]).strip()), text
    for bad in ({"x": 1}, {str(token): 101}, {"-1": 1}):
        r = http.post("/v1/jobs", json={"prompt": "Hi", "logit_bias": bad})
        assert r.status_code == 422 and r.json()["error"]["field"] == "logit_bias", (bad, r.text)


def test_every_engine_option_is_a_server_setting() -> None:
    names = {f.name for f in dataclasses.fields(EngineOptions)}
    assert names <= set(Settings.model_fields)
    args = Settings(max_workers=4, attention="reference").engine_args()
    assert args[args.index("--max-workers") + 1] == "4"
    assert args[args.index("--attention") + 1] == "reference"


@pytest.mark.parametrize(("origins", "credentials"), [(["*"], None), (["https://lab.example"], "true")])
def test_cors_sends_credentials_only_to_named_origins(origins: list[str], credentials: str | None) -> None:
    """With ``*`` every site could act with a user's cookie, so it gets no credentials."""
    from starlette.testclient import TestClient

    from server.app import create_app

    app = create_app(Settings(cors_origins=origins, engine_address="127.0.0.1:9", ready_timeout_s=0.1))
    with TestClient(app) as client:
        headers = {"Origin": "https://lab.example", "Access-Control-Request-Method": "POST"}
        r = client.options("/v1/jobs", headers=headers)
    assert r.status_code == 200
    assert r.headers.get("access-control-allow-credentials") == credentials
    assert r.headers["access-control-allow-origin"] in ("*", "https://lab.example")


def test_a_hung_engine_is_detected_refused_and_restarted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGSTOP: /ready stayed 200 and requests hung for as long as the engine was stopped. Now a busy engine
    that says nothing for engine_stall_s turns /ready 503 with the reason, requests fail at once with 503,
    and after engine_kill_s it is killed, its jobs end with an error, and a new engine serves."""
    flags = ("--engine-stall-s", "1", "--engine-kill-s", "4")
    with running_server(tiny_model_dir, tmp_path, *flags) as server, api(server) as http:
        job = submit(http, prompt="Count to a million.", max_tokens=1000, quick_check_every=0)
        while not http.get(f"/v1/jobs/{job['id']}").json()["workers"][0]["generated"]:
            time.sleep(0.05)
        engine = server.engine_pid()
        os.kill(engine, signal.SIGSTOP)
        try:
            for _ in range(200):  # a hang guard: detection takes about engine_stall_s
                ready = http.get("/ready", timeout=5)
                if ready.status_code == 503:
                    break
                time.sleep(0.05)
            assert ready.status_code == 503 and "not answered" in ready.json()["reason"]
            refused = http.post("/v1/jobs", json={"prompt": "Hi"}, timeout=5)
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "engine_unavailable"
            failed = wait_for(http, job["id"], ("failed",))  # the kill ends it
            assert "SIGKILL" in (failed["error"] or "")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine, signal.SIGCONT)
        for _ in range(int(WAIT_S * 10)):  # a hang guard for the restart (loading the model)
            if http.get("/ready").status_code == 200:
                break
            time.sleep(0.1)
        assert server.engine_pid() != engine
        again = submit(http, max_tokens=4)
        assert wait_for(http, again["id"], ("finished",))["usage"]["completion_tokens"] > 0


def test_a_lone_surrogate_is_refused_naming_its_field(http: httpx.Client) -> None:
    """JSON can carry one (\\ud800), UTF-8 cannot: the message leaked a codec error and named no field."""
    json_type = {"content-type": "application/json"}
    r = http.post("/v1/jobs", content=b'{"prompt": "hi \\ud800"}', headers=json_type)
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompt", r.text
    chat = b'{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "\\udc00"}]}'
    r = http.post("/v1/chat/completions", content=chat, headers=json_type)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.1.content", r.text
    r = http.post("/v1/jobs", json={"prompt": "fine \U0001f600", "max_tokens": 2})  # a real astral char
    assert r.status_code == 201


def test_a_body_shorter_than_its_content_length_gets_408(server: ServerProcess) -> None:
    """It held the connection open for good (the session's server waits 2 s for a body)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        sock.sendall((head + "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}").encode())
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408"), answer[:200]


def test_the_openapi_document_lists_every_status_and_the_prompt_rule(server: ServerProcess) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    create = spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"201", "401", "408", "413", "422", "429", "503"} <= set(create)
    assert "404" in spec["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    body = spec["components"]["schemas"]["JobRequest"]
    assert body["oneOf"] == [{"required": ["prompt"]}, {"required": ["messages"]}]
    assert "error" in spec["components"]["schemas"]["ErrorBody"]["properties"]
    for path in ("/v1/chat/completions", "/v1/completions"):  # OpenAI's statuses and error shape
        answers = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "408", "413", "429", "500", "503"} <= set(answers)
        assert "422" not in answers
        assert answers["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIErrorBody")
    assert "422" not in spec["paths"]["/v1/models"]["get"]["responses"]


def test_a_model_that_cannot_be_served_stops_the_server_with_status_2(tmp_path: Path) -> None:
    """It stayed up for good, answering 503 and restarting an engine that could only fail the same way."""
    missing = tmp_path / "no-such-model"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOGWILD_") or k == "HOGWILD_CACHE"}
    cmd = [sys.executable, "-m", "server", "--port", "0", "--model", str(missing)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT_S, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"cannot serve the model {missing}" in done.stderr
    assert done.stderr.count("restarting") == 0
