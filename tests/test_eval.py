"""``hogwild eval`` (clients/eval): scorers, data, systems, self-consistency votes, retries, resume, the
report, and one run end to end against a real server (the session's tiny model: the mechanics, not the
accuracy, are what it proves)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from clients import Event, HogwildError
from clients.cli import main as hogwild_main
from clients.eval import main as eval_main
from clients.eval import report
from clients.eval.data import SAMPLE, DataError, Problem, load_problems, prompt_text, reference_answer
from clients.eval.runner import (
    RESULTS,
    FatalError,
    JobResult,
    Run,
    read_results,
    run_job,
    unit_records,
)
from clients.eval.scoring import choice_letter, majority_vote, make_scorer, normalize, to_number
from clients.eval.systems import default_systems, job_bodies, parse_system, select_systems
from tests.server_process import API_KEY

MATH = make_scorer("math")

# -- scorers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        (r"\frac{1}{2}", "0.5"),
        ("0.5", r"\frac{1}{2}"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        (r"\dfrac{3}{4}", "0.75"),
        (r"5 \text{ cm}", "5"),
        (r"\text{5 apples}", "5"),
        ("12 dollars", "12"),
        (r"\$12", "12"),
        ("3 km/h", "3"),
        (r"45^\circ", "45"),
        ("1,000", "1000"),
        ("x = 3", "3"),
        ("2x+1", "1+2x"),
        (r"\boxed{21}", "21"),
        ("38 rolls.", "38"),
        ("$38$", "38"),
    ],
)
def test_math_scorer_accepts_equivalent_forms(answer: str, reference: str) -> None:
    assert MATH.correct(answer, reference)


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        ("7", "8"),
        (r"\frac{1}{3}", "0.3333"),
        ("2x+1", "2x"),
        (r"\sqrt{2}", "2"),
        ("a long ramble that mentions 12", "12"),
        ("", "3"),
        (None, "3"),
        ("3 pi", "3"),  # pi is not a unit
    ],
)
def test_math_scorer_rejects_wrong_answers(answer: str | None, reference: str) -> None:
    assert not MATH.correct(answer, reference)


def test_normalize_strips_wrappers_and_units_but_not_math() -> None:
    assert normalize(r"\text{ 14 dollars }") == "14"
    assert normalize(r"\boxed{\$3.50}") == "3.50"
    assert normalize(r"2\sqrt{2}") == r"2\sqrt{2}"
    assert normalize("x^2 + 1") == "x^2 + 1"


def test_numeric_scorer_reads_one_number_within_tolerance() -> None:
    numeric = make_scorer("numeric", rel_tol=1e-3)
    assert numeric.correct(r"\frac{3}{4}", "0.75")
    assert numeric.correct("1,234.5", "1234.5")
    assert numeric.correct("3.1416", "3.14159")
    assert not numeric.correct("3.2", "3.14159")
    assert not numeric.correct("no number here", "3")
    assert to_number("-2/4") == -0.5
    assert to_number("about 7 apples") == 7.0


def test_exact_and_choice_scorers() -> None:
    exact = make_scorer("exact")
    assert exact.correct(r"\text{ Paris }", "paris")
    assert not exact.correct("Paris, France", "Paris")
    choice = make_scorer("choice")
    for written in ("B", "(B)", "B) 42", r"\text{B}", "The answer is B", "b."):
        assert choice_letter(written) == "B", written
        assert choice.correct(written, "(B)")
    assert not choice.correct("A", "B")
    assert not choice.correct(None, "B")


def test_unknown_scorer_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("fuzzy")


# -- self-consistency -----------------------------------------------------------------------------------


def test_majority_vote_groups_equivalent_answers() -> None:
    assert majority_vote(["3", r"\frac{1}{2}", "0.5", None, "3", "1/2"], MATH) == (r"\frac{1}{2}", 3)
    assert majority_vote(["4", "3"], MATH) == ("4", 1)  # a tie: the first group
    assert majority_vote([None, "", None], MATH) == (None, 0)


def _result(job_id: str, answers: dict[int, str | None], tokens: int = 10) -> JobResult:
    from clients.eval.runner import Checkpoint

    cps = {b: Checkpoint(b, a, tokens * b, 0.1 * b) for b, a in answers.items()}
    return JobResult(job_id, cps, "finished", "length")


def test_self_consistency_records_vote_per_budget() -> None:
    problem = Problem("p1", "What is 1 + 2?", "3")
    system = parse_system("sc-w3")
    results = [
        _result("a", {8: "4", 16: "3"}),
        _result("b", {8: "4", 16: r"\frac{6}{2}"}),
        _result("c", {8: "3", 16: "5"}),
    ]
    by_budget = {r["budget"]: r for r in unit_records(problem, system, [8, 16], results, MATH)}
    assert by_budget[8]["answer"] == "4" and by_budget[8]["verdict"] == "wrong" and by_budget[8]["votes"] == 2
    assert by_budget[16]["answer"] == "3" and by_budget[16]["verdict"] == "correct"
    assert by_budget[16]["samples"] == ["3", r"\frac{6}{2}", "5"]
    assert by_budget[16]["tokens"] == 3 * 160  # every sample's tokens count
    assert by_budget[16]["latency_s"] == pytest.approx(1.6)  # the samples run side by side
    assert by_budget[8]["job_ids"] == ["a", "b", "c"]


def test_a_failed_job_is_an_error_not_a_wrong_answer() -> None:
    problem = Problem("p1", "q", "3")
    failed = JobResult("x", {8: _result("x", {8: "3"}).checkpoints[8]}, "failed", "error", "engine died")
    recs = unit_records(problem, parse_system("plain"), [8, 16], [failed], MATH)
    assert [r["verdict"] for r in recs] == ["correct", "error"]  # 8 was reported before the failure
    assert recs[1]["error"] == "engine died" and recs[1]["correct"] is None
    summary = report.summarize(recs)
    assert summary["plain"]["budgets"]["16"] == {
        "n": 0,
        "correct": 0,
        "errors": 1,
        "accuracy": None,
        "ci95": None,
        "mean_tokens": None,
        "mean_latency_s": None,
    }


# -- data -----------------------------------------------------------------------------------------------


def test_sample_set_loads_with_numeric_answers() -> None:
    problems = load_problems([SAMPLE])
    assert 25 <= len(problems) <= 40
    assert len({p.id for p in problems}) == len(problems)
    assert all(to_number(p.reference) is not None for p in problems)


def test_usual_exports_are_recognized(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"question": "GSM-like", "answer": "Some steps.\n#### 1,200"},
        {"problem": "MATH-like", "solution": r"So it is $\boxed{\frac{1}{2}}$.", "unique_id": "m/1"},
        {"question": "Olympiad-like", "final_answer": ["$2\\sqrt{2}$"], "id": 7},
        {"prompt": "plain", "answer": 42},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    problems = load_problems([path])
    assert [p.reference for p in problems] == ["1,200", r"\frac{1}{2}", r"2\sqrt{2}", "42"]
    assert [p.id for p in problems] == ["mixed-1", "m/1", "7", "mixed-4"]
    shuffled = load_problems([path], shuffle=True, seed=3, limit=2)
    assert shuffled == load_problems([path], shuffle=True, seed=3)[:2]
    assert {p.id for p in load_problems([path], shuffle=True, seed=3)} == {p.id for p in problems}


def test_keys_can_be_named_and_bad_records_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"q": "What?", "gold": "5", "choices": ["4", "5"]}) + "\n")
    (problem,) = load_problems([path], problem_key="q", answer_key="gold")
    assert problem.reference == "5"
    assert prompt_text(problem, "Q: {problem} in \\boxed{}") == "Q: What?\n\nA. 4\nB. 5 in \\boxed{}"
    with pytest.raises(DataError, match=r"custom.jsonl:1: no problem under problem, question, prompt"):
        load_problems([path])
    path.write_text('{"problem": "x", "answer": "1"}\nnot json\n')
    with pytest.raises(DataError, match=r"custom.jsonl:2: not JSON"):
        load_problems([path])
    assert reference_answer([1, 2]) == "1, 2"


# -- systems --------------------------------------------------------------------------------------------


def test_system_names_and_selection() -> None:
    names = [s.name for s in default_systems([2, 4], ["combined", "interleaved"], ["full"])]
    assert names == [
        "plain",
        "hogwild-w2-combined-full",
        "hogwild-w2-interleaved-full",
        "hogwild-w4-combined-full",
        "hogwild-w4-interleaved-full",
        "sc-w2",
        "sc-w4",
    ]
    candidates = default_systems([2, 4], ["combined"], ["full", "short"])
    chosen = select_systems(["plain", "hogwild-w4-*", "sc-w8"], candidates)
    assert [s.name for s in chosen] == [
        "plain",
        "hogwild-w4-combined-full",
        "hogwild-w4-combined-short",
        "sc-w8",
    ]
    hw = parse_system("hogwild-w3-contiguous-short")
    assert (hw.kind, hw.workers, hw.layout, hw.instructions) == ("hogwild", 3, "contiguous", "short")
    assert parse_system("hogwild-w2-combined-my-preset").instructions == "my-preset"
    for bad in ("hogwild-w2-diagonal-full", "sc-w0", "beam"):
        with pytest.raises(ValueError):
            parse_system(bad)


def test_job_bodies_ask_for_every_budget_in_one_job() -> None:
    (hw,) = job_bodies(parse_system("hogwild-w2-combined-short"), "P", "p1", [512, 256, 1024])
    assert hw["max_tokens"] == 1024 and hw["checkpoints"] == [256, 512, 1024]
    assert (hw["workers"], hw["layout"], hw["instructions"]) == (2, "combined", "short")
    (plain,) = job_bodies(parse_system("plain"), "P", "p1", [8])
    assert (plain["workers"], plain["layout"]) == (1, "plain") and "instructions" not in plain
    assert plain["temperature"] is None  # left to the model's generation_config
    samples = job_bodies(parse_system("sc-w4"), "P", "p1", [8], sc_temperature=0.7)
    assert len(samples) == 4 and len({s["seed"] for s in samples}) == 4
    assert all(s["temperature"] == 0.7 and s["layout"] == "plain" for s in samples)
    assert job_bodies(parse_system("sc-w2"), "P", "p1", [8], sc_temperature=0.7) == samples[:2]
    other = job_bodies(parse_system("sc-w2"), "P", "p2", [8], sc_temperature=0.7)
    assert {s["seed"] for s in other}.isdisjoint(s["seed"] for s in samples)


# -- jobs against a fake client -------------------------------------------------------------------------


class FakeClient:
    """Answers like the server: each checkpoint's answer is ``answer(body, budget)``."""

    def __init__(self, answer: Any = None, full: int = 0, refuse: HogwildError | None = None) -> None:
        self.answer = answer or (lambda body, budget: "3")
        self.full = full  # 429s before a job is accepted
        self.refuse = refuse
        self.bodies: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        self.lock = threading.Lock()

    def submit(self, prompt: str | None = None, **options: Any) -> dict[str, Any]:
        with self.lock:
            if self.refuse is not None:
                raise self.refuse
            if self.full:
                self.full -= 1
                raise HogwildError(429, "queue full", retry_after=0.25)
            self.bodies.append({"prompt": prompt, **options})
            return {"id": f"job-{len(self.bodies) - 1}"}

    def _checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        body = self.bodies[int(job_id.split("-")[1])]
        return [
            {"budget": b, "answer": self.answer(body, b), "tokens": b * body["workers"]}
            for b in body["checkpoints"]
        ]

    def events(self, job_id: str) -> Iterator[Event]:
        n = 0
        for cp in self._checkpoints(job_id):
            yield Event(n, "token", {"worker": 0, "text": "x"})
            yield Event(n + 1, "checkpoint", cp)
            n += 2
        yield Event(n, "done", {"finish_reason": "length"})

    def get(self, job_id: str) -> dict[str, Any]:
        cps = self._checkpoints(job_id)
        usage = {"completion_tokens": cps[-1]["tokens"]}
        return {
            "id": job_id,
            "status": "finished",
            "finish_reason": "length",
            "checkpoints": cps,
            "usage": usage,
        }

    def cancel(self, job_id: str) -> dict[str, Any]:
        self.cancelled.append(job_id)
        return {"id": job_id}


def test_full_queue_is_retried_after_retry_after() -> None:
    client = FakeClient(full=2)
    slept: list[float] = []
    body = job_bodies(parse_system("plain"), "P", "p1", [8, 16])[0]
    result = run_job(client, body, sleep=slept.append)
    assert slept == [0.25, 0.25]
    assert result.error is None and result.status == "finished"
    assert {b: (c.answer, c.tokens) for b, c in result.checkpoints.items()} == {8: ("3", 8), 16: ("3", 16)}
    assert all(c.latency_s is not None for c in result.checkpoints.values())


def test_a_refused_option_stops_the_run_and_a_refused_prompt_does_not() -> None:
    body = job_bodies(parse_system("plain"), "P", "p1", [8])[0]
    old_server = FakeClient(refuse=HogwildError(422, "extra inputs are not permitted", field="checkpoints"))
    with pytest.raises(FatalError, match="predates answer checkpoints"):
        run_job(old_server, body)
    too_long = FakeClient(refuse=HogwildError(413, "prompt too long", field="prompt"))
    result = run_job(too_long, body)
    assert result.job_id is None and "prompt too long" in (result.error or "")
    assert (
        unit_records(Problem("p1", "P", "3"), parse_system("plain"), [8], [result], MATH)[0]["verdict"]
        == "error"
    )


def _run(tmp_path: Path, client: FakeClient, systems: list[str], resume: bool = False, **kw: Any) -> Run:
    problems = load_problems([SAMPLE], limit=4)
    return Run(
        problems,
        select_systems(systems, []),
        [8, 16],
        MATH,
        tmp_path,
        lambda body, stop, submitted: run_job(client, body, stop, submitted, sleep=lambda s: None),
        canceller=client.cancel,
        concurrency=3,
        resume=resume,
        **kw,
    )


def test_run_writes_one_record_per_problem_system_budget_and_resume_skips_them(tmp_path: Path) -> None:
    client = FakeClient(answer=lambda body, budget: "391" if budget == 16 else "0")
    progress = _run(tmp_path, client, ["plain", "hogwild-w2-combined-full", "sc-w2", "sc-w4"]).execute()
    # sc-w2's two samples are sc-w4's first two: 4 problems x (1 + 1 + 4) jobs, not x (1 + 1 + 2 + 4).
    assert len(client.bodies) == progress.jobs_done == 4 * 6
    lines = (tmp_path / RESULTS).read_text().splitlines()
    assert len(lines) == 4 * 4 * 2 == len(progress.records)
    rec = json.loads(lines[0])
    for key in ("problem_id", "system", "budget", "answer", "reference", "verdict", "tokens", "latency_s"):
        assert key in rec
    summary = report.summarize(progress.records)
    assert summary["plain"]["budgets"]["16"]["correct"] == 1  # only sample-01 is 391
    assert summary["hogwild-w2-combined-full"]["budgets"]["8"]["mean_tokens"] == 16

    again = FakeClient()
    state = _run(
        tmp_path, again, ["plain", "hogwild-w2-combined-full", "sc-w2", "sc-w4"], resume=True
    ).execute()
    assert again.bodies == [] and state.skipped_units == 16 and state.units_total == 0

    # A record lost (a torn last line) and one that was an error: exactly those units run again.
    records = [json.loads(x) for x in lines]
    records[5]["verdict"] = "error"
    kept = [json.dumps(r) for r in records if r["problem_id"] != "sample-04" or r["system"] != "plain"]
    (tmp_path / RESULTS).write_text("\n".join(kept) + '\n{"problem_id": "sample-0')
    third = FakeClient()
    state = _run(
        tmp_path, third, ["plain", "hogwild-w2-combined-full", "sc-w2", "sc-w4"], resume=True
    ).execute()
    rerun = {(r["problem_id"], r["system"]) for r in state.records}
    assert rerun == {("sample-04", "plain"), (records[5]["problem_id"], records[5]["system"])}
    final = read_results(tmp_path / RESULTS)
    assert len(final) == 4 * 4 * 2 and all(r["verdict"] != "error" for r in final.values())


def test_interrupt_cancels_the_jobs_in_flight(tmp_path: Path) -> None:
    client = FakeClient()
    started = threading.Event()
    release = threading.Event()

    def slow(body: dict[str, Any], stop: threading.Event, submitted: Any) -> JobResult:
        submitted(f"job-{body['seed']}")
        started.set()
        release.wait(5)
        return JobResult(None, error="cancelled")

    seen: list[int] = []

    def interrupt(progress: Any) -> None:
        seen.append(progress.jobs_done)
        if len(seen) == 1:
            started.wait(5)
            raise KeyboardInterrupt

    run = _run(tmp_path, client, ["plain"], on_update=interrupt)
    run.job_runner = slow

    def cancel(job_id: str) -> None:
        client.cancelled.append(job_id)
        release.set()

    run.canceller = cancel
    with pytest.raises(KeyboardInterrupt):
        run.execute()
    assert client.cancelled and all(j.startswith("job-") for j in client.cancelled)


# -- the report -----------------------------------------------------------------------------------------


def test_wilson_interval() -> None:
    lo, hi = report.wilson(0, 10) or (None, None)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = report.wilson(5, 10) or (None, None)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert report.wilson(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    assert report.wilson(0, 0) is None


def test_plots_and_table(tmp_path: Path) -> None:
    records = [
        {"problem_id": f"p{i}", "system": s, "budget": b, "verdict": v, "tokens": b * w, "workers": w}
        for i in range(4)
        for s, w in (("plain", 1), ("hogwild-w2-combined-full", 2))
        for b, v in ((8, "wrong"), (16, "correct" if i % 2 else "wrong"))
    ]
    summary = report.summarize(records)
    assert summary["plain"]["budgets"]["16"]["accuracy"] == 0.5
    paths = report.plot(summary, tmp_path, title="test")
    assert [p.name for p in paths] == ["accuracy_vs_budget.png", "accuracy_vs_tokens.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    console = Console(record=True, width=200)
    console.print(report.table(summary))
    text = console.export_text()
    assert "50.0% (2/4)" in text and "0.0% (0/4)" in text and "32 tok total" in text


# -- the command ----------------------------------------------------------------------------------------


def test_cli_refuses_to_mix_runs_and_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / RESULTS).write_text('{"problem_id": "a", "system": "plain", "budget": 8}\n')
    assert eval_main(["--out", str(tmp_path), "--url", "http://127.0.0.1:9"]) == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--budgets", "0"])
    assert eval_main(["--systems", "hogwild-w2-diagonal-full", "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(SystemExit) as exit_:
        hogwild_main(["eval", "--help"])
    assert exit_.value.code == 0 and "hogwild eval" in capsys.readouterr().out


def _has_checkpoints(url: str) -> bool:
    """Whether the server takes the checkpoint, layout and instructions fields (422 before they landed)."""
    body = {"prompt": "1 + 1?", "workers": 1, "layout": "plain", "max_tokens": 1, "checkpoints": [1]}
    reply = httpx.post(
        f"{url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    if reply.status_code == 201:
        httpx.delete(f"{url}/v1/jobs/{reply.json()['id']}", headers={"Authorization": f"Bearer {API_KEY}"})
        return True
    return False


def test_eval_end_to_end_against_a_server(server_url: str, tmp_path: Path) -> None:
    if not _has_checkpoints(server_url):
        pytest.skip("the server does not take answer checkpoints yet")
    out = tmp_path / "out"
    args = ["--url", server_url, "--api-key", API_KEY, "--limit", "3", "--budgets", "8", "16"]
    args += [
        "--systems",
        "plain",
        "hogwild-w2-combined-full",
        "--out",
        str(out),
        "--quiet",
        "--concurrency",
        "2",
    ]
    assert eval_main(args) == 0
    lines = [json.loads(x) for x in (out / RESULTS).read_text().splitlines()]
    assert len(lines) == 3 * 2 * 2
    assert {(r["system"], r["budget"]) for r in lines} == {
        (s, b) for s in ("plain", "hogwild-w2-combined-full") for b in (8, 16)
    }
    for rec in lines:
        assert rec["verdict"] in ("correct", "wrong"), rec  # the tiny model is random: never an error
        assert rec["tokens"] > 0 and rec["latency_s"] is not None and rec["job_ids"][0].startswith("job-")
    hw = [r for r in lines if r["system"] == "hogwild-w2-combined-full"]
    assert len({r["job_ids"][0] for r in hw}) == 3  # one job per problem for both budgets
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["jobs"] == 6 and summary["config"]["model"]
    assert summary["systems"]["plain"]["budgets"]["16"]["n"] == 3
    for name in ("accuracy_vs_budget.png", "accuracy_vs_tokens.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # Resuming a finished run submits nothing and changes no record.
    assert eval_main([*args, "--resume"]) == 0
    assert [json.loads(x) for x in (out / RESULTS).read_text().splitlines()] == lines
    assert json.loads((out / "summary.json").read_text())["run"]["jobs"] == 0
