"""The soak's judges on made-up traffic: a soak that cannot fail proves nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from soak.checks import check_log, holder_problems
from soak.traffic import Call, judge_stream

pytestmark = pytest.mark.timeout(10)


def chunk(content: str | None = None, finish: str | None = None) -> str:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return "data: " + json.dumps({"choices": [choice]})


def stream_call(*lines: str, leave: bool = False) -> Call:
    call = Call("soak-c0-0000", 0, "m", True, 8, leave, 0.0, status=200, received=list(lines))
    call.abandoned = leave
    return call


def log_line(call: Call, outcome: str = "ok", response: Any = "Hi") -> dict[str, Any]:
    return {
        "model_requested": call.model,
        "stream": call.stream,
        "status": 200 if outcome == "ok" else 499,
        "outcome": outcome,
        "prompt": [{"role": "user", "content": f"[{call.tag}] Say hello."}],
        "response": response,
    }


def test_judge_stream_accepts_a_whole_stream() -> None:
    call = stream_call(": loading m 2s", chunk("Hi"), chunk(finish="length"), "data: [DONE]")
    assert judge_stream(call) is None
    assert call.content == "Hi"


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        ((chunk("Hi"), chunk(finish="stop")), "did not end with data: [DONE]"),
        ((chunk("Hi"), "data: [DONE]"), "no finish_reason"),
        ((chunk(), "data: [DONE]"), "an empty stream"),
        (("data: [DONE]",), "an empty stream"),
        ((chunk("Hi"), 'data: {"error": {"code": "x", "message": "m"}}', "data: [DONE]"), "error"),
    ],
)
def test_judge_stream_names_what_is_missing(lines: tuple[str, ...], why: str) -> None:
    assert why in (judge_stream(stream_call(*lines)) or "")


def test_judge_stream_lets_a_client_leave_but_not_over_an_error() -> None:
    assert judge_stream(stream_call(chunk("Hi"), leave=True)) is None
    error = 'data: {"error": {"code": "backend_not_ready", "message": "m"}}'
    assert judge_stream(stream_call(error, leave=True)) is not None


def test_check_log_catches_a_truncated_stream_logged_as_ok() -> None:
    call = stream_call(chunk("Hi"))
    call.problem = judge_stream(call)
    found = check_log([call], [log_line(call)])
    assert [p.kind for p in found.broken_ok] == [
        "logged as ok, but the client got: the stream did not end with data: [DONE]"
    ]


def test_check_log_wants_one_line_that_agrees_with_the_client() -> None:
    call = stream_call(chunk("Hi"), chunk(finish="stop"), "data: [DONE]")
    call.problem = judge_stream(call)
    assert not check_log([call], [log_line(call)]).mismatches
    assert check_log([call], [log_line(call), log_line(call)]).mismatches
    assert check_log([call], []).mismatches
    assert check_log([call], [log_line(call, response="Hello")]).mismatches
    assert check_log([call], [log_line(call, outcome="cancelled")]).mismatches


def test_holder_problems_allows_one_holder_at_a_time() -> None:
    history = [
        (1.0, "starting", "a"),
        (2.0, "ready", "a"),
        (3.0, "stopping", "a"),
        (4.0, "stopped", "a"),
        (5.0, "starting", "b"),
        (6.0, "failed", "b"),
        (7.0, "starting", "a"),
    ]
    assert holder_problems(history, 0.0) == []


def test_holder_problems_catches_a_start_before_the_stop() -> None:
    history = [(1.0, "starting", "a"), (2.0, "ready", "a"), (3.0, "starting", "b")]
    [problem] = holder_problems(history, 0.0)
    assert problem.kind == "starting while ready another model"
    assert "+2.00s ready a" in problem.detail
