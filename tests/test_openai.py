"""The OpenAI-compatible routes past the happy path, through the official ``openai`` package over real HTTP
(the session's server on the tiny model): OpenAI's errors, logprobs, stop, /v1/completions, /v1/models."""

from __future__ import annotations

import math
import socket
import time
from typing import Any

import httpx
import openai
import pytest

from server.openai_api import StopCut
from tests.server_process import API_KEY, ServerProcess

USER: Any = [{"role": "user", "content": "What is 2 + 2?"}]
# One ordinary greedy sequence: the model's own tokens, nothing forced, nothing appended.
PLAIN: Any = {"workers": 1, "layout": "plain", "finisher": False}


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def warm(client: openai.OpenAI, model: str) -> None:
    """Put the full pages of USER's plain prompt (the completions' "What is 2 + 2?" too) in the prefix cache,
    so that the requests compared next compute the same tokens in the same shapes: one that computes the
    whole prompt and one that reads most of it from the cache differ in bfloat16's last bits, enough to
    turn a near tie between two greedy tokens."""
    client.chat.completions.create(model=model, messages=USER, max_tokens=1, extra_body=PLAIN)


def worker_text(reasoning: str, name: str = "Alice") -> str:
    head = f"[{name}]\n"
    assert reasoning.startswith(head), reasoning
    return reasoning[len(head) :]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"temperature": -1}, "temperature"),  # refused by the engine, named all the same
        ({"extra_body": {"workers": 99}}, "workers"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_a_bad_chat_parameter_is_a_400_naming_it(
    client: openai.OpenAI, model: str, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=USER, **{"max_tokens": 2, **kwargs})
    error = caught.value
    assert error.status_code == 400 and error.param == param, error.body
    assert error.type == "invalid_request_error" and isinstance(error.code, str)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 2}, "n"),
    ],
)
def test_a_bad_completion_parameter_is_a_400_naming_it(
    client: openai.OpenAI, model: str, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=model, **{"prompt": "q", "max_tokens": 2, **kwargs})
    assert caught.value.param == param, caught.value.body


def test_other_refusals_keep_openais_shape_and_the_jobs_api_keeps_its_own(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.models.list()
    assert denied.value.code == "invalid_api_key"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    big = httpx.post(f"{server.url}/v1/completions", content=b"x" * 2_000_000, headers=auth, timeout=30)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # the server waits 2 s for a body
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        sock.sendall((head + "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{}").encode())
        late = sock.recv(4096).decode()
    assert late.startswith("HTTP/1.1 408") and '"code":"request_timeout"' in late.replace(" ", ""), late
    jobs = httpx.post(f"{server.url}/v1/jobs", json={"prompt": "q", "workers": 99}, headers=auth, timeout=30)
    assert jobs.status_code == 422 and jobs.json()["error"] == {
        "message": jobs.json()["error"]["message"],
        "type": "invalid",
        "field": "workers",
        "code": 422,
    }


def test_chat_logprobs_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    kw: Any = dict(model=model, messages=USER, max_tokens=6, temperature=0, extra_body=PLAIN)
    warm(client, model)
    reply = client.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    assert reply.usage is not None and 0 < len(tokens) <= reply.usage.completion_tokens
    for token in tokens:
        top = token.top_logprobs
        assert len(top) == 3 and token.bytes == list(token.token.encode())
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert sum(math.exp(t.logprob) for t in top) <= 1 + 1e-6
        assert token.logprob == pytest.approx(top[0].logprob)  # greedy: the model's most likely token
        assert (token.model_extra or {})["worker"] == 0
    reasoning = (choice.message.model_extra or {})["reasoning_content"]
    assert "".join(t.token for t in tokens).strip() == worker_text(reasoning)
    chunks = list(client.chat.completions.create(logprobs=True, top_logprobs=3, stream=True, **kw))
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content or ()
    ]
    assert [t.token for t in streamed] == [t.token for t in tokens]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in tokens], abs=1e-6)
    plain = client.chat.completions.create(**kw)
    assert plain.choices[0].logprobs is None


def test_jobs_api_token_events_carry_logprobs_when_asked(server: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as http:
        body = {"prompt": "What is 6 * 7?", "max_tokens": 3, "workers": 2, "finisher": False, "stream": True}
        with http.stream("POST", "/v1/jobs", json={**body, "logprobs": 2}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: {")]
        tokens = [httpx.Response(200, content=line[6:]).json() for line in lines]
        tokens = [t for t in tokens if "token_id" in t]
        sampled = [t for t in tokens if not t["forced"]]
        assert len(sampled) == 6 and all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in sampled)
        assert {"token_id", "text", "logprob"} == set(sampled[0]["top_logprobs"][0])
        assert all("logprob" not in t for t in tokens if t["forced"])  # the openers were never sampled
        refused = http.post("/v1/jobs", json={**body, "logprobs": 21, "stream": False})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "logprobs"


def test_stop_cuts_before_the_string_and_appends_no_finisher_text(client: openai.OpenAI, model: str) -> None:
    kw: Any = dict(model=model, messages=USER, max_tokens=12, temperature=0)
    warm(client, model)
    free = client.chat.completions.create(logprobs=True, extra_body=PLAIN, **kw)
    assert free.choices[0].logprobs is not None
    tokens = [t.token for t in free.choices[0].logprobs.content or ()]
    text = "".join(tokens)
    stop = tokens[3] + tokens[4]
    expected = text[: text.find(stop)]
    # With the finisher on: it would run once the worker stops, writing its prompt after the stop string.
    with_finisher = {**PLAIN, "finisher": True}
    reply = client.chat.completions.create(stop=[stop, "never in the text"], extra_body=with_finisher, **kw)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert worker_text((choice.message.model_extra or {})["reasoning_content"]) == expected.strip()
    assert stop not in (choice.message.content or "")
    chunks = list(client.chat.completions.create(stop=stop, stream=True, extra_body=with_finisher, **kw))
    deltas = [
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    ]
    assert "".join(deltas) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    done = client.completions.create(
        model=model, prompt="What is 2 + 2?", max_tokens=12, temperature=0, stop=stop, extra_body=PLAIN
    )
    assert done.choices[0].finish_reason == "stop"


def test_a_stop_string_split_across_pieces_is_held_back_and_cut() -> None:
    cut = StopCut(("STOP", "xy"))
    sent = [cut.push(piece, sampled=True) for piece in ("ab", "cS", "TO", "P and more")]
    assert sent == ["ab", "c", "", ""] and cut.hit and cut.flush() == ""
    cut = StopCut(("STOP",))
    assert [cut.push(p, sampled=True) for p in ("aST", "OX")] == ["a", "STOX"] and not cut.hit
    assert cut.push("ST", sampled=True) == "" and cut.flush() == "ST"  # the end releases what was held
    forced = StopCut(("**",))
    assert forced.push("**Alice [1]:** ", sampled=False) == "**Alice [1]:** " and not forced.hit


def test_completions_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    kw: Any = dict(model=model, max_tokens=5, temperature=0, extra_body=PLAIN)
    warm(client, model)
    reply = client.completions.create(prompt="What is 2 + 2?", logprobs=2, **kw)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    lp = choice.logprobs
    assert (
        lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    )
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(
        len(top) <= 2 and max(top.values()) == pytest.approx(p)
        for top, p in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    reasoning = (choice.model_extra or {})["reasoning_content"]
    assert worker_text(reasoning) == "".join(lp.tokens).strip()
    again = client.completions.create(prompt=["What is 2 + 2?"], **kw)  # a list of exactly one prompt
    assert again.choices[0].text == choice.text and again.choices[0].logprobs is None
    chunks = list(
        client.completions.create(
            prompt="What is 2 + 2?", stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    pieces = "".join(
        (c.choices[0].model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices
    )
    assert worker_text(reasoning) == pieces.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    )


def test_models_say_when_the_model_was_loaded_and_its_context(client: openai.OpenAI, model: str) -> None:
    entry = client.models.list().data[0]
    assert time.time() - 3600 < entry.created <= time.time()
    assert (entry.model_extra or {})["max_model_len"] == 4096  # the tiny model's positions
    assert client.models.retrieve(model).id == model
