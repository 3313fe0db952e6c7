"""OpenAI's answer fields: the requested model name, `refusal` and `logprobs`, in whole answers
and (as bytes) in stream events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from imageworks.chat_proxy.normalize.response import ModelRenamer, complete_answer

SERVED = "smollm2-135m-instruct"
REQUESTED = "smollm2 135m (Q4 1)"


def completion(**choice: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": "hi"}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": SERVED,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop", **choice}],
    }


def event(chunk: dict[str, Any], **dumps: Any) -> bytes:
    return b"data: " + json.dumps(chunk, **dumps).encode() + b"\n\n"


def data(event: bytes) -> dict[str, Any]:
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    parsed: dict[str, Any] = json.loads(event[6:])
    return parsed


CHUNK = {
    "choices": [{"index": 0, "delta": {"content": "I"}, "finish_reason": None}],
    "created": 1,
    "id": "chatcmpl-1",
    "model": SERVED,
    "object": "chat.completion.chunk",
}


def test_complete_answer_names_the_requested_model() -> None:
    assert complete_answer(completion(), REQUESTED)["model"] == REQUESTED


def test_complete_answer_keeps_the_backend_model_when_told_to() -> None:
    assert complete_answer(completion(), None)["model"] == SERVED


def test_complete_answer_adds_null_refusal_and_logprobs() -> None:
    choice = complete_answer(completion(), REQUESTED)["choices"][0]
    assert choice["logprobs"] is None
    assert choice["message"]["refusal"] is None
    assert choice["message"]["content"] == "hi"


def test_complete_answer_keeps_what_the_backend_sent() -> None:
    logprobs = {"content": [{"token": "hi", "logprob": -0.1, "bytes": None, "top_logprobs": []}]}
    body = completion(logprobs=logprobs)
    body["choices"][0]["message"]["refusal"] = "I cannot."
    choice = complete_answer(body, REQUESTED)["choices"][0]
    assert choice["logprobs"] == logprobs
    assert choice["message"]["refusal"] == "I cannot."


def test_complete_answer_returns_its_input_when_complete() -> None:
    body = completion(logprobs=None)
    body["choices"][0]["message"]["refusal"] = None
    assert complete_answer(body, SERVED) is body
    assert complete_answer(body, None) is body


def test_complete_answer_does_not_mutate_its_input() -> None:
    body = completion()
    before = json.dumps(body)
    complete_answer(body, REQUESTED)
    assert json.dumps(body) == before


def test_complete_answer_leaves_odd_choices_alone() -> None:
    body = {"model": SERVED, "choices": ["junk", {"index": 0}]}
    assert complete_answer(body, REQUESTED)["choices"] == ["junk", {"index": 0, "logprobs": None}]


@pytest.mark.parametrize(
    "dumps",
    [
        {"separators": (",", ":")},  # llama-server, vLLM
        {},  # Python's default, spaced (llama-cpp-python)
    ],
    ids=["compact", "spaced"],
)
def test_renamer_rewrites_the_model_of_an_event(dumps: dict[str, Any]) -> None:
    renamed = ModelRenamer(SERVED, REQUESTED).event(event(CHUNK, **dumps))
    assert data(renamed) == {**CHUNK, "model": REQUESTED}


def test_renamer_changes_only_the_model_bytes() -> None:
    original = event(CHUNK, separators=(",", ":"))
    renamed = ModelRenamer(SERVED, REQUESTED).event(original)
    assert renamed == original.replace(f'"{SERVED}"'.encode(), f'"{REQUESTED}"'.encode())


def test_renamer_json_escapes_the_new_name() -> None:
    name = 'odd "name" \\ with ünïcode'
    renamed = ModelRenamer(SERVED, name).event(event(CHUNK))
    assert data(renamed)["model"] == name


def test_renamer_finds_a_served_id_written_with_unicode_escapes() -> None:
    served = "modèle/7b"
    chunk = {**CHUNK, "model": served}
    for ensure_ascii in (True, False):
        renamed = ModelRenamer(served, REQUESTED).event(event(chunk, ensure_ascii=ensure_ascii))
        assert data(renamed) == {**chunk, "model": REQUESTED}


def test_renamer_rewrites_another_name_the_backend_gives() -> None:
    chunk = {**CHUNK, "model": "/models/SmolLM2-135M-Instruct.Q4_1.gguf"}
    renamed = ModelRenamer(SERVED, REQUESTED).event(event(chunk))
    assert data(renamed) == {**chunk, "model": REQUESTED}


def test_renamer_does_not_take_a_longer_id_for_the_served_one() -> None:
    chunk = {**CHUNK, "model": SERVED + "-v2"}
    renamed = ModelRenamer(SERVED, REQUESTED).event(event(chunk, separators=(",", ":")))
    assert data(renamed) == {**chunk, "model": REQUESTED}


def test_renamer_leaves_model_text_in_the_content_alone() -> None:
    text = f'say "model": "{SERVED}"'
    chunk = {**CHUNK, "choices": [{"index": 0, "delta": {"content": text}}]}
    for dumps in ({"separators": (",", ":")}, {}):
        renamed = data(ModelRenamer(SERVED, REQUESTED).event(event(chunk, **dumps)))
        assert renamed["choices"][0]["delta"]["content"] == text
        assert renamed["model"] == REQUESTED


def test_renamer_parses_an_event_with_a_nested_model_key() -> None:
    chunk = {**CHUNK, "extra": {"model": SERVED}}
    renamed = data(ModelRenamer(SERVED, REQUESTED).event(event(chunk)))
    assert renamed == {**chunk, "model": REQUESTED}


def test_renamer_leaves_events_without_a_model_as_they_are() -> None:
    renamer = ModelRenamer(SERVED, REQUESTED)
    error = event({"error": {"message": "boom"}})
    assert renamer.event(error) is error
    done = b"data: [DONE]\n\n"
    assert renamer.event(done) is done
