"""Telling a finished stream from a cut one, on the events the client receives."""

from __future__ import annotations

import json
from typing import Any

import pytest

from imageworks.chat_proxy.normalize.stream import (
    EventNormalizer,
    backend_error,
    finishes_a_choice,
)


def event(chunk: Any, *, spaced: bool = False) -> bytes:
    separators = (", ", ": ") if spaced else (",", ":")
    return b"data: " + json.dumps(chunk, separators=separators).encode() + b"\n\n"


def chunk(*finish_reasons: str | None, content: str = "") -> dict[str, Any]:
    choices = [
        {"index": i, "delta": {"content": content}, "finish_reason": reason}
        for i, reason in enumerate(finish_reasons)
    ]
    return {"id": "c", "object": "chat.completion.chunk", "choices": choices}


@pytest.mark.parametrize("spaced", [False, True])
def test_finish_reason_stop_finishes_a_choice(spaced: bool) -> None:
    assert finishes_a_choice(event(chunk("stop"), spaced=spaced))


@pytest.mark.parametrize("spaced", [False, True])
def test_null_finish_reason_does_not(spaced: bool) -> None:
    assert not finishes_a_choice(event(chunk(None), spaced=spaced))


def test_any_choice_finishing_counts() -> None:
    assert finishes_a_choice(event(chunk(None, "length")))


def test_the_words_in_the_text_do_not_count() -> None:
    text = '{"finish_reason": "stop"} and "finish_reason":"stop"'
    assert not finishes_a_choice(event(chunk(None, content=text)))


def test_events_without_choices_do_not_count() -> None:
    assert not finishes_a_choice(event({"choices": [], "usage": {"total_tokens": 3}}))
    assert not finishes_a_choice(b": loading m 5s\n\n")
    assert not finishes_a_choice(b"data: [DONE]\n\n")


def test_normalizer_remembers_a_finish_seen_on_what_it_sends() -> None:
    normalizer = EventNormalizer(tools=True, split_think=True)
    normalizer.process(event(chunk(None, content="Hello")))
    assert not normalizer.finished
    normalizer.process(event(chunk("stop")))
    normalizer.process(event({"choices": [], "usage": {"total_tokens": 3}}))
    assert normalizer.finished


def test_normalizer_judges_legacy_function_calls_by_their_rewritten_finish() -> None:
    normalizer = EventNormalizer(tools=True, split_think=False)
    sent = normalizer.process(
        event({"choices": [{"index": 0, "delta": {}, "finish_reason": "function_call"}]})
    )
    assert normalizer.finished
    assert b"tool_calls" in sent


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'data: {"error": {"message": "out of memory", "code": 500}}\n\n', "out of memory"),
        (b'data:{"error":"boom"}\n\n', "boom"),
    ],
)
def test_backend_error_events_are_recognised(raw: bytes, message: str) -> None:
    error = backend_error(raw)
    assert error is not None
    assert error["message"] == message


def test_ordinary_events_are_not_backend_errors() -> None:
    assert backend_error(event(chunk(None, content='{"error": 1}'))) is None
    assert backend_error(b"data: [DONE]\n\n") is None
