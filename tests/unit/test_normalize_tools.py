from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from imageworks.chat_proxy.normalize.tools import (
    ToolStreamNormalizer,
    may_need_tool_normalization,
    new_call_id,
    normalize_completion,
    normalize_tool_request,
)
from support.wire import plain, typed_request

JsonDict = dict[str, Any]
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")
ID1 = f"call_{1:024x}"
ID2 = f"call_{2:024x}"
ARGS = '{"city": "Paris", "unit": "celsius"}'
WEATHER = {"name": "get_weather", "arguments": ARGS}


def _counting_ids() -> Callable[[], str]:
    """Ids in the real format, numbered from 1, so expected bodies can be written out."""
    counter = itertools.count(1)
    return lambda: f"call_{next(counter):024x}"


def _completion(message: JsonDict, finish_reason: str | None = "stop") -> JsonDict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
    }


def _chunk(delta: JsonDict, finish_reason: str | None = None, choice: int = 0) -> JsonDict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": choice, "delta": delta, "finish_reason": finish_reason}],
    }


def _pieces(text: str, size: int = 3) -> list[str]:
    return [text[start : start + size] for start in range(0, len(text), size)]


def _tool_call(call_id: str, name: str, arguments: str) -> JsonDict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _normalize_stream(chunks: list[JsonDict], **options: Any) -> list[JsonDict]:
    normalizer = ToolStreamNormalizer(**options)
    return [normalizer.normalize_chunk(chunk) for chunk in chunks]


def _reassemble(chunks: list[JsonDict]) -> dict[int, JsonDict]:
    """Per choice index, what the OpenAI SDK accumulates: fragments merged by `index`, their
    string fields (id, name, arguments) concatenated; `ids` counts the fragments carrying an id."""
    choices: dict[int, JsonDict] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            state = choices.setdefault(choice["index"], {"calls": {}, "finish_reason": None})
            state["finish_reason"] = choice["finish_reason"] or state["finish_reason"]
            assert "function_call" not in choice["delta"]
            for fragment in choice["delta"].get("tool_calls") or []:
                assert isinstance(fragment["index"], int)
                call = state["calls"].setdefault(
                    fragment["index"],
                    {"id": "", "type": None, "name": "", "arguments": "", "ids": 0},
                )
                call["ids"] += "id" in fragment
                call["id"] += fragment.get("id") or ""
                call["type"] = fragment.get("type") or call["type"]
                function = fragment.get("function") or {}
                call["name"] += function.get("name") or ""
                call["arguments"] += function.get("arguments") or ""
    return choices


def _calls(state: JsonDict) -> list[JsonDict]:
    """The reassembled calls of one choice, in the `message.tool_calls` shape, by index."""
    return [
        _tool_call(call["id"], call["name"], call["arguments"])
        for _, call in sorted(state["calls"].items())
    ]


# ---------------------------------------------------------------- whole responses

COMPLETION_CASES = {
    "legacy function_call": (
        {"role": "assistant", "content": None, "function_call": WEATHER},
        "function_call",
        {"role": "assistant", "content": None, "tool_calls": [_tool_call(ID1, **WEATHER)]},
        "tool_calls",
    ),
    "legacy function_call keeps its text": (
        {"role": "assistant", "content": "Checking.", "function_call": WEATHER},
        "stop",
        {"role": "assistant", "content": "Checking.", "tool_calls": [_tool_call(ID1, **WEATHER)]},
        "stop",
    ),
    "legacy object arguments": (
        {"role": "assistant", "function_call": {"name": "f", "arguments": {"city": "Zürich"}}},
        "function_call",
        {"role": "assistant", "tool_calls": [_tool_call(ID1, "f", '{"city": "Zürich"}')]},
        "tool_calls",
    ),
    "legacy null arguments": (
        {"role": "assistant", "function_call": {"name": "f", "arguments": None}},
        None,
        {"role": "assistant", "tool_calls": [_tool_call(ID1, "f", "{}")]},
        None,
    ),
    "legacy beside tool_calls is dropped": (
        {"role": "assistant", "function_call": WEATHER, "tool_calls": [_tool_call("c", **WEATHER)]},
        "tool_calls",
        {"role": "assistant", "tool_calls": [_tool_call("c", **WEATHER)]},
        "tool_calls",
    ),
    "ollama object arguments, no id or type": (
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": [1]}}}]},
        "tool_calls",
        {"role": "assistant", "tool_calls": [_tool_call(ID1, "f", json.dumps({"a": [1]}))]},
        "tool_calls",
    ),
    "list, number and missing arguments": (
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": [1, "é"]}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": 2.5}},
                {"id": "c", "type": "function", "function": {"name": "h"}},
            ],
        },
        "tool_calls",
        {
            "role": "assistant",
            "tool_calls": [
                _tool_call("a", "f", '[1, "é"]'),
                _tool_call("b", "g", "2.5"),
                _tool_call("c", "h", "{}"),
            ],
        },
        "tool_calls",
    ),
    "missing ids are each filled": (
        {
            "role": "assistant",
            "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": None, "function": {"name": "g", "arguments": "{}"}},
            ],
        },
        "tool_calls",
        {
            "role": "assistant",
            "tool_calls": [_tool_call(ID1, "f", "{}"), _tool_call(ID2, "g", "{}")],
        },
        "tool_calls",
    ),
    "finish_reason function_call alone": (
        {"role": "assistant", "tool_calls": [_tool_call("c", **WEATHER)]},
        "function_call",
        {"role": "assistant", "tool_calls": [_tool_call("c", **WEATHER)]},
        "tool_calls",
    ),
}


@pytest.mark.parametrize(
    ("message", "finish", "expected_message", "expected_finish"),
    COMPLETION_CASES.values(),
    ids=COMPLETION_CASES.keys(),
)
def test_completion_tool_calls_take_openai_shape(
    message: JsonDict, finish: str | None, expected_message: JsonDict, expected_finish: str | None
) -> None:
    body = _completion(message, finish)
    before = copy.deepcopy(body)
    result = normalize_completion(body, new_id=_counting_ids())
    assert result == _completion(expected_message, expected_finish)
    assert body == before  # the input is not modified


def test_completion_object_arguments_equal_json_dumps() -> None:
    arguments = {"query": "café ☕", "limit": 3, "filters": {"open": True, "tags": None}}
    message = {
        "role": "assistant",
        "tool_calls": [{"function": {"name": "f", "arguments": arguments}}],
    }
    result = normalize_completion(_completion(message))
    text = result["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert text == json.dumps(arguments, ensure_ascii=False)
    assert json.loads(text) == arguments  # JSON, not Python's repr


def test_completion_generated_ids_are_unique_and_well_formed() -> None:
    call = {"function": {"name": "f", "arguments": "{}"}}
    result = normalize_completion(_completion({"role": "assistant", "tool_calls": [call, call]}))
    ids = [tool["id"] for tool in result["choices"][0]["message"]["tool_calls"]]
    assert all(CALL_ID.match(call_id) for call_id in ids)
    assert len(set(ids)) == 2


UNCHANGED_COMPLETIONS = {
    "plain text": _completion({"role": "assistant", "content": "Hello"}),
    "JSON answer with a name key": _completion(
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'}
    ),
    "fenced JSON answer": _completion(
        {"role": "assistant", "content": '```json\n{"name": "x", "arguments": "{}"}\n```'}
    ),
    "tag-shaped answer": _completion(
        {"role": "assistant", "content": "<name>get_weather</name><arguments>{}</arguments>"}
    ),
    "well-formed tool_calls": _completion(
        {"role": "assistant", "content": None, "tool_calls": [_tool_call("c", **WEATHER)]},
        "tool_calls",
    ),
    "null function_call": _completion(
        {"role": "assistant", "content": "Hi", "function_call": None, "tool_calls": None}
    ),
    "empty tool_calls": _completion({"role": "assistant", "content": "Hi", "tool_calls": []}),
    "no choices": {"object": "chat.completion", "choices": []},
    "error body": {"error": {"message": "boom", "type": "server_error"}},
    "choices not a list": {"choices": {"0": {"message": {"function_call": WEATHER}}}},
    "choice not a dict": {"choices": ["function_call"]},
}


@pytest.mark.parametrize("body", UNCHANGED_COMPLETIONS.values(), ids=UNCHANGED_COMPLETIONS.keys())
def test_completion_needing_no_change_is_returned_itself(body: JsonDict) -> None:
    before = copy.deepcopy(body)
    assert normalize_completion(body) is body
    assert body == before


# ---------------------------------------------------------------- streams

LEGACY_SPLIT = [
    _chunk({"role": "assistant", "content": None}),
    _chunk({"function_call": {"name": "get_weather", "arguments": ""}}),
    *[_chunk({"function_call": {"arguments": piece}}) for piece in _pieces(ARGS)],
    _chunk({}, "function_call"),
]

STREAM_CASES: dict[str, tuple[list[JsonDict], dict[int, list[tuple[str, str]]]]] = {
    "legacy function_call split across many chunks": (
        LEGACY_SPLIT,
        {0: [("get_weather", ARGS)]},
    ),
    "legacy with arguments on the first fragment and the name repeated": (
        [
            _chunk({"function_call": {"name": "get_weather", "arguments": ARGS[:5]}}),
            *[
                _chunk({"function_call": {"name": "get_weather", "arguments": piece}})
                for piece in _pieces(ARGS[5:], 4)
            ],
            _chunk({}, "function_call"),
        ],
        {0: [("get_weather", ARGS)]},
    ),
    "two parallel calls interleaved, no ids": (
        [
            _chunk({"tool_calls": [{"index": 0, "function": {"name": "a", "arguments": ""}}]}),
            _chunk({"tool_calls": [{"index": 1, "function": {"name": "b", "arguments": '{"y"'}}]}),
            _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": 1}'}}]}),
            _chunk({"tool_calls": [{"index": 1, "function": {"arguments": ": 2}"}}]}),
            _chunk({}, "tool_calls"),
        ],
        {0: [("a", '{"x": 1}'), ("b", '{"y": 2}')]},
    ),
    "two parallel calls in one chunk": (
        [
            _chunk(
                {
                    "tool_calls": [
                        {"index": 0, "id": "call_a", "function": {"name": "a", "arguments": "{"}},
                        {"index": 1, "id": "call_b", "function": {"name": "b", "arguments": "{"}},
                    ]
                }
            ),
            _chunk(
                {
                    "tool_calls": [
                        {"index": 0, "function": {"arguments": "}"}},
                        {"index": 1, "function": {"arguments": "}"}},
                    ]
                }
            ),
        ],
        {0: [("a", "{}"), ("b", "{}")]},
    ),
    "ollama whole calls, object arguments, no index or id": (
        [
            _chunk({"tool_calls": [{"function": {"name": "a", "arguments": {"x": "é"}}}]}),
            _chunk({"tool_calls": [{"function": {"name": "b", "arguments": {}}}]}),
            _chunk({"content": ""}, "tool_calls"),
        ],
        {0: [("a", json.dumps({"x": "é"}, ensure_ascii=False)), ("b", "{}")]},
    ),
    "no index: ids start calls, anonymous fragments continue the latest": (
        [
            _chunk({"tool_calls": [{"id": "call_a", "function": {"name": "a", "arguments": "{"}}]}),
            _chunk({"tool_calls": [{"function": {"arguments": "}"}}]}),
            _chunk({"tool_calls": [{"id": "call_b", "function": {"name": "b", "arguments": "["}}]}),
            _chunk({"tool_calls": [{"function": {"arguments": "]"}}]}),
        ],
        {0: [("a", "{}"), ("b", "[]")]},
    ),
    "two choices, each with a legacy call": (
        [
            _chunk({"function_call": {"name": "a", "arguments": ""}}, choice=0),
            _chunk({"function_call": {"name": "b", "arguments": "{"}}, choice=1),
            _chunk({"function_call": {"arguments": "{}"}}, choice=0),
            _chunk({"function_call": {"arguments": "}"}}, choice=1),
            _chunk({}, "function_call", choice=0),
            _chunk({}, "function_call", choice=1),
        ],
        {0: [("a", "{}")], 1: [("b", "{}")]},
    ),
}


@pytest.mark.parametrize(("chunks", "expected"), STREAM_CASES.values(), ids=STREAM_CASES.keys())
def test_stream_reassembles_to_one_id_per_call(
    chunks: list[JsonDict], expected: dict[int, list[tuple[str, str]]]
) -> None:
    before = copy.deepcopy(chunks)
    choices = _reassemble(_normalize_stream(chunks))
    assert chunks == before  # the inputs are not modified
    assert {
        index: [(call["function"]["name"], call["function"]["arguments"]) for call in _calls(state)]
        for index, state in choices.items()
        if state["calls"]
    } == expected
    all_calls = [call for state in choices.values() for call in state["calls"].values()]
    assert all(call["ids"] == 1 and call["type"] == "function" for call in all_calls)
    assert len({call["id"] for call in all_calls}) == len(all_calls)
    assert all(state["finish_reason"] in (None, "tool_calls") for state in choices.values())


def test_stream_legacy_call_equals_the_whole_response() -> None:
    streamed = _reassemble(_normalize_stream(LEGACY_SPLIT, new_id=_counting_ids()))[0]
    whole = normalize_completion(
        _completion(
            {"role": "assistant", "content": None, "function_call": WEATHER}, "function_call"
        ),
        new_id=_counting_ids(),
    )["choices"][0]
    assert _calls(streamed) == whole["message"]["tool_calls"]
    assert streamed["finish_reason"] == whole["finish_reason"] == "tool_calls"


def test_stream_legacy_fragments_carry_id_type_and_name_only_first() -> None:
    chunks = [
        _chunk({"function_call": {"name": "get_weather", "arguments": ""}}),
        _chunk({"function_call": {"name": "get_weather", "arguments": '{"ci'}}),
        _chunk({"function_call": {"arguments": 'ty": 1}'}}),
    ]
    deltas = [
        chunk["choices"][0]["delta"] for chunk in _normalize_stream(chunks, new_id=_counting_ids())
    ]
    assert deltas == [
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": ID1,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": 1}'}}]},
    ]


def test_stream_missing_ids_filled_once_per_call_and_stable() -> None:
    chunks = [
        _chunk({"tool_calls": [{"index": 0, "function": {"name": "a", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        _chunk({"tool_calls": [{"index": 1, "function": {"name": "b", "arguments": "{}"}}]}),
    ]
    first, later, second = (
        chunk["choices"][0]["delta"]["tool_calls"][0] for chunk in _normalize_stream(chunks)
    )
    assert CALL_ID.match(first["id"])
    assert CALL_ID.match(second["id"])
    assert first["id"] != second["id"]
    assert later is chunks[1]["choices"][0]["delta"]["tool_calls"][0]  # later fragments untouched
    other_stream = _normalize_stream(chunks[:1])[0]["choices"][0]["delta"]["tool_calls"][0]
    assert other_stream["id"] != first["id"]


def test_stream_index_stays_stable_per_id() -> None:
    chunks = [
        _chunk({"tool_calls": [{"id": "call_a", "function": {"name": "a", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"id": "call_b", "function": {"name": "b", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"id": "call_a", "function": {"arguments": "{}"}}]}),
    ]
    indices = [
        chunk["choices"][0]["delta"]["tool_calls"][0]["index"]
        for chunk in _normalize_stream(chunks)
    ]
    assert indices == [0, 1, 0]


@pytest.mark.parametrize(
    ("finish", "expected"),
    [("function_call", "tool_calls"), ("tool_calls", "tool_calls"), ("stop", "stop"), (None, None)],
)
def test_stream_finish_reason_mapping(finish: str | None, expected: str | None) -> None:
    (result,) = _normalize_stream([_chunk({}, finish)])
    assert result["choices"][0]["finish_reason"] == expected


def test_stream_json_content_is_left_alone() -> None:
    chunk = _chunk({"content": '{"name": "get_weather", "arguments": {"city": "Paris"}}'}, "stop")
    assert ToolStreamNormalizer().normalize_chunk(chunk) is chunk


UNCHANGED_STREAMS = {
    "role": [_chunk({"role": "assistant", "content": ""})],
    "content": [_chunk({"content": "Hello"})],
    "reasoning": [_chunk({"reasoning_content": "Thinking"})],
    "finish stop": [_chunk({}, "stop")],
    "usage only": [
        {"object": "chat.completion.chunk", "choices": [], "usage": {"total_tokens": 3}}
    ],
    "null function_call": [_chunk({"content": "x", "function_call": None, "tool_calls": None})],
    "well-formed native tool call": [
        _chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "a", "arguments": ""},
                    }
                ]
            }
        ),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        _chunk({}, "tool_calls"),
    ],
}


@pytest.mark.parametrize("chunks", UNCHANGED_STREAMS.values(), ids=UNCHANGED_STREAMS.keys())
def test_stream_chunk_needing_no_change_is_returned_itself(chunks: list[JsonDict]) -> None:
    normalizer = ToolStreamNormalizer()
    for chunk in chunks:
        assert normalizer.normalize_chunk(chunk) is chunk


@pytest.mark.parametrize(("chunks", "expected"), STREAM_CASES.values(), ids=STREAM_CASES.keys())
def test_stream_matches_openai_sdk_accumulation(
    chunks: list[JsonDict], expected: dict[int, list[tuple[str, str]]]
) -> None:
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in _normalize_stream(chunks):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion()
    sdk = {
        choice.index: [
            (call.function.name, call.function.arguments)
            for call in choice.message.tool_calls or []
        ]
        for choice in final.choices
        if choice.message.tool_calls
    }
    assert sdk == expected
    sdk_ids = [call.id for choice in final.choices for call in choice.message.tool_calls or []]
    assert all(CALL_ID.match(call_id) or call_id in ("call_a", "call_b") for call_id in sdk_ids)


MAY_NEED_CASES = [
    (b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\n', False),
    (b'data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}\n\n', True),
    (b'data: {"choices":[{"delta":{"function_call":{"name":"f"}}}]}\n\n', True),
    (b'data: {"choices": [{"delta": {"tool_calls" : []}}]}\n\n', True),
    (b'data: {"choices":[{"delta":{},"finish_reason":"function_call"}]}\n\n', True),
    (b'data: {"choices":[{"delta":{"content":"say \\"tool_calls\\" twice"}}]}\n\n', False),
    (b'data: {"choices":[{"delta":{"content":"function_call tool_calls"}}]}\n\n', False),
    (json.dumps({"content": 'a"tool_calls'}).encode(), False),
    (json.dumps({"content": "end\\", "function_call": None}).encode(), True),
    (b"data: [DONE]\n\n", False),
]


@pytest.mark.parametrize(("event", "expected"), MAY_NEED_CASES)
def test_may_need_tool_normalization_matches_only_the_keys(event: bytes, expected: bool) -> None:
    assert may_need_tool_normalization(event) is expected


def test_new_call_id_format() -> None:
    first, second = new_call_id(), new_call_id()
    assert CALL_ID.match(first)
    assert CALL_ID.match(second)
    assert first != second


# ---------------------------------------------------------------- requests

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
FUNCTION = {"name": "f", "description": "F.", "parameters": {"type": "object"}}
BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

REQUEST_CASES = {
    "empty tools with tool_choice": (
        {**BASE, "tools": [], "tool_choice": "auto", "parallel_tool_calls": True},
        BASE,
    ),
    "null tools": ({**BASE, "tools": None, "tool_choice": "none"}, BASE),
    "legacy functions, auto": (
        {**BASE, "functions": [FUNCTION], "function_call": "auto"},
        {**BASE, "tools": [{"type": "function", "function": FUNCTION}], "tool_choice": "auto"},
    ),
    "legacy functions, none": (
        {**BASE, "functions": [FUNCTION], "function_call": "none"},
        {**BASE, "tools": [{"type": "function", "function": FUNCTION}], "tool_choice": "none"},
    ),
    "legacy functions, named": (
        {**BASE, "functions": [FUNCTION], "function_call": {"name": "f"}},
        {
            **BASE,
            "tools": [{"type": "function", "function": FUNCTION}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
    ),
    "legacy functions without function_call": (
        {**BASE, "functions": [FUNCTION]},
        {**BASE, "tools": [{"type": "function", "function": FUNCTION}]},
    ),
    "legacy functions empty": ({**BASE, "functions": [], "function_call": "auto"}, BASE),
    "legacy beside tools is dropped": (
        {
            **BASE,
            "tools": [TOOL],
            "tool_choice": "required",
            "functions": [FUNCTION],
            "function_call": "auto",
        },
        {**BASE, "tools": [TOOL], "tool_choice": "required"},
    ),
    "legacy function_call without functions": ({**BASE, "function_call": "auto"}, BASE),
}


@pytest.mark.parametrize(("body", "expected"), REQUEST_CASES.values(), ids=REQUEST_CASES.keys())
def test_tool_request_normalized(body: JsonDict, expected: JsonDict) -> None:
    request = typed_request(body)
    assert plain(normalize_tool_request(request)) == expected
    assert plain(request) == body


UNCHANGED_REQUESTS = {
    "no tools": BASE,
    "tools": {**BASE, "tools": [TOOL], "tool_choice": "auto"},
    "tool_choice alone": {**BASE, "tool_choice": "none"},
}


@pytest.mark.parametrize("body", UNCHANGED_REQUESTS.values(), ids=UNCHANGED_REQUESTS.keys())
def test_tool_request_needing_no_change_is_returned_itself(body: JsonDict) -> None:
    request = typed_request(body)
    assert normalize_tool_request(request) is request
