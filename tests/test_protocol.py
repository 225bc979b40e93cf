"""The contract between the engine and its front ends (engine/protocol.py): one JobOptions for every
per-job option, the command-line flags made from it, and no torch on the way."""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

import pytest

from engine.errors import InvalidRequest
from engine.protocol import MAX_LIST, MAX_TEXT, JobOptions, add_job_flags, job_params


def refused(params: dict[str, Any]) -> str:
    with pytest.raises(InvalidRequest) as info:
        JobOptions.parse(params)
    return info.value.field


def test_parse_normalizes_what_json_and_keywords_give() -> None:
    options = JobOptions.parse(
        {
            "workers": 3,
            "stop": "END",
            "checkpoints": [64, 32],
            "suppress": ["#"],
            "logit_bias": {"7": 5, "3": -100.0},
            "temperature": None,  # None is the default's
        }
    )
    assert options.stop == ("END",) and options.checkpoints == (64, 32) and options.suppress == ("#",)
    assert options.logit_bias == ((3, -100.0), (7, 5.0))
    assert options.temperature is None and options.layout == "combined"
    assert JobOptions.parse({"logit_bias": [(7, 1)]}).logit_bias == ((7, 1.0),)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"wokers": 2}, "wokers"),
        ({"workers": 0}, "workers"),
        ({"workers": True}, "workers"),  # no lax coercion of a bool to an int
        ({"workers": "2"}, "workers"),
        ({"layout": "circle"}, "layout"),
        ({"layout": "plain", "workers": 2}, "workers"),
        ({"max_tokens": 8, "checkpoints": [9]}, "checkpoints"),
        ({"checkpoints": list(range(1, 66))}, "checkpoints"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * (MAX_LIST + 1)}, "stop"),
        ({"stop": ["x" * (MAX_TEXT + 1)]}, "stop"),  # per-token stop checks stay bounded
        ({"suppress": [3]}, "suppress"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"1": True}}, "logit_bias"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": 2**64}, "seed"),
        ({"finisher": "yes"}, "finisher"),
        ({"finisher_tokens": 2000}, "finisher_tokens"),
        ({"quick_check_every": -1}, "quick_check_every"),
        ({"answer_pattern": 3}, "answer_pattern"),
        ({"logprobs": 21}, "logprobs"),  # OpenAI's top_logprobs bound
        ({"logprobs": -1}, "logprobs"),
    ],
)
def test_bad_options_name_their_field(params: dict[str, Any], field: str) -> None:
    assert refused(params) == field


def test_the_engine_limits_name_their_field() -> None:
    options = JobOptions.parse({"workers": 9, "max_tokens": 100})
    with pytest.raises(InvalidRequest) as info:
        options.within(max_workers=8, max_tokens=1000)
    assert info.value.field == "workers"
    with pytest.raises(InvalidRequest) as info:
        options.within(max_workers=16, max_tokens=99)
    assert info.value.field == "max_tokens"


def test_command_line_flags_cover_every_option_and_round_trip() -> None:
    parser = argparse.ArgumentParser()
    add_job_flags(parser)
    flags = {a.dest for a in parser._actions} - {"help"}
    assert flags == {f for f in JobOptions.__dataclass_fields__ if f != "trace"}
    argv = [
        "--workers",
        "3",
        "--layout",
        "interleaved",
        "--max-tokens",
        "64",
        "--temperature",
        "0.5",
        "--top-p",
        "0.9",
        "--top-k",
        "5",
        "--seed",
        "7",
        "--stop",
        "END",
        "--stop",
        "STOP",
        "--logit-bias",
        "11=-2.5",
        "--quick-check-every",
        "0",
        "--no-finisher",
        "--finisher-tokens",
        "8",
        "--checkpoints",
        "16",
        "32",
        "--instructions",
        "short",
        "--suppress",
        "#",
        "--answer-pattern",
        "ANSWER:(\\d+)",
        "--logprobs",
        "3",
    ]
    options = JobOptions.parse(job_params(parser.parse_args(argv)))
    assert options == JobOptions(
        workers=3,
        layout="interleaved",
        max_tokens=64,
        temperature=0.5,
        top_p=0.9,
        top_k=5,
        seed=7,
        stop=("END", "STOP"),
        logit_bias=((11, -2.5),),
        quick_check_every=0,
        finisher=False,
        finisher_tokens=8,
        checkpoints=(16, 32),
        instructions="short",
        suppress=("#",),
        answer_pattern="ANSWER:(\\d+)",
        logprobs=3,
    )
    assert job_params(parser.parse_args([])) == {}  # nothing given: every default is the engine's
    assert job_params(parser.parse_args(["--no-suppress", "--finisher", "true"])) == {
        "suppress": False,
        "finisher": True,
    }


def test_the_contract_imports_no_torch() -> None:
    code = "import sys, engine.protocol, engine.connection; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
