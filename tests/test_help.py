"""``--help`` describes every flag of the command lines, with its default: read off the printed help, so a
setting or an option added without a description (or whose default the help gets wrong) fails here."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from engine import serve
from engine.protocol import EngineOptions, JobOptions, shown_default
from server.settings import Settings

DEFAULT = re.compile(r"\(default: (.+)\)$")


def help_entries(text: str) -> dict[str, str]:
    """Each argument of an argparse help, by its first flag (or its name), and its help text."""
    entries: dict[str, str] = {}
    current = None
    listing = False
    for line in text.splitlines():
        if line and not line.startswith(" "):  # a heading, the usage, the description, the epilog
            listing = line in ("options:", "optional arguments:", "positional arguments:")
            current = None
        elif listing and re.match(r"  \S", line):
            invocation, _, help = line.strip().partition("  ")
            current = invocation.split(",")[0].split()[0]
            entries[current] = help.strip()
        elif listing and current is not None and line.strip():
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


def command_help(*command: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOGWILD_")}
    out = subprocess.run(
        [sys.executable, "-m", *command, "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return help_entries(out.stdout)


def check_described(entries: dict[str, str]) -> None:
    """Every argument says what it is; every flag but --help and an alias ("same as ...") its default."""
    for flag, help in entries.items():
        assert DEFAULT.sub("", help).strip(), f"{flag} has no description: {help!r}"
        if flag.startswith("--") and flag != "--help" and not help.startswith("same as "):
            assert DEFAULT.search(help), f"{flag} shows no default: {help!r}"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_the_server_help_describes_every_setting_with_its_default() -> None:
    entries = command_help("server")
    check_described(entries)
    engine = {f.name: f for f in dataclasses.fields(EngineOptions)}
    for name, field in Settings.model_fields.items():  # every field, whoever adds it
        assert flag(name) in entries, f"no {flag(name)} in the help"
        default = field.default
        if default is None and name in engine:
            default = engine[name].default  # the engine's default applies
        if default is not None:
            shown = DEFAULT.search(entries[flag(name)])
            assert shown and shown.group(1) == shown_default(default), (name, entries[flag(name)])
    assert DEFAULT.search(entries["--port"]).group(1) == "8000"  # type: ignore[union-attr]
    assert DEFAULT.search(entries["--max-workers"]).group(1) == "16"  # type: ignore[union-attr]
    assert "SmolLM2" in entries["--model"]


def test_the_cli_help_describes_every_flag_with_its_default() -> None:
    entries = command_help("clients.cli")
    check_described(entries)
    assert {"problem", "--url", "--api-key", "--json", "--columns", "--stream"} <= set(entries)
    for field in dataclasses.fields(JobOptions):
        if field.name == "trace":  # the oracle's, not a command line's
            continue
        assert flag(field.name) in entries, f"no {flag(field.name)} in the help"
        if field.default is not None:
            shown = DEFAULT.search(entries[flag(field.name)])
            assert shown and shown.group(1) == shown_default(field.default), entries[flag(field.name)]
    assert DEFAULT.search(entries["--url"]).group(1) == "http://127.0.0.1:8000"  # type: ignore[union-attr]
    for command in ("jobs", "get"):
        check_described(command_help("clients.cli", command))


def test_the_engine_help_describes_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        serve.main(["--help"])
    entries = help_entries(capsys.readouterr().out)
    check_described(entries)
    for field in dataclasses.fields(EngineOptions):
        assert flag(field.name) in entries


def test_help_entries_reads_wrapped_and_missing_help() -> None:
    text = (
        "usage: x\n\noptions:\n  -h, --help  show this help\n  --long-flag LONG_FLAG [LONG_FLAG ...]\n"
        "              first line\n              second (default: 3)\n  --bare N\n\nepilog  text\n"
    )
    entries = help_entries(text)
    assert entries == {"-h": "show this help", "--long-flag": "first line second (default: 3)", "--bare": ""}
    with pytest.raises(AssertionError, match="--bare has no description"):
        check_described(entries)
