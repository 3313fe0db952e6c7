from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from imageworks.chat_proxy.normalize.ollama import (
    OllamaStreamTranslator,
    from_ollama_chat,
    to_ollama_chat,
)
from imageworks.chat_proxy.protocol import BadGateway, InvalidRequest
from support.wire import typed_request

USER = [{"role": "user", "content": "hi"}]
PNG = "iVBORw0KGgoAAAANSUhEUg=="
CALL_ID = re.compile(r"^call_[0-9a-f]+$")
CREATED_AT = "2024-07-22T20:33:28.123648291Z"
CREATED = 1721680408


def _request(**fields: Any) -> dict[str, Any]:
    return {"model": "client-name", "messages": USER, **fields}


def _to(body: dict[str, Any], num_ctx: int | None = None) -> dict[str, Any]:
    return to_ollama_chat(typed_request(body), model="qwen3:8b", num_ctx=num_ctx)


# -- requests -------------------------------------------------------------------------------


def test_request_text_only() -> None:
    assert _to(_request()) == {
        "model": "qwen3:8b",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "options": {},
    }


def test_request_stream_flag() -> None:
    assert _to(_request(stream=True))["stream"] is True


def test_request_list_content_text_joined_and_images_inlined() -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "text", "text": "Be brief."},
    ]
    message = _to(_request(messages=[{"role": "user", "content": content}]))["messages"][0]
    assert message == {"role": "user", "content": "What is this?\nBe brief.", "images": [PNG]}


@pytest.mark.parametrize(
    "url",
    ["https://example.com/cat.png", "http://10.0.0.1/x.jpg", "data:image/png,rawbytes", "x"],
)
def test_request_image_urls_are_refused_not_fetched(url: str) -> None:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(InvalidRequest, match="inline"):
        _to(_request(messages=[{"role": "user", "content": content}]))


def test_request_unknown_content_part_is_refused() -> None:
    content = [{"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}]
    with pytest.raises(InvalidRequest, match="input_audio"):
        _to(_request(messages=[{"role": "user", "content": content}]))


def test_request_sampling_params_go_to_options() -> None:
    body = _request(
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        seed=7,
        stop="</s>",
        max_tokens=64,
        frequency_penalty=0.1,
        presence_penalty=0.3,
    )
    assert _to(body, num_ctx=8192)["options"] == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
        "stop": ["</s>"],
        "num_predict": 64,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.3,
        "num_ctx": 8192,
    }
    assert "temperature" not in body.get("options", {})  # top level stays OpenAI-shaped


@pytest.mark.parametrize(
    ("fields", "num_predict"),
    [
        ({"max_completion_tokens": 10}, 10),
        ({"max_completion_tokens": 10, "max_tokens": 99}, 10),
        ({"max_tokens": 99, "max_completion_tokens": None}, 99),
    ],
)
def test_request_token_limit_is_num_predict(fields: dict[str, Any], num_predict: int) -> None:
    assert _to(_request(**fields))["options"]["num_predict"] == num_predict


def test_request_stop_list_and_null_params() -> None:
    options = _to(_request(stop=["a", "b"], temperature=None))["options"]
    assert options == {"stop": ["a", "b"]}


def test_request_ollama_extras_pass_through() -> None:
    body = _request(options={"num_gpu": 20, "temperature": 1.0}, temperature=0.5, keep_alive="5m")
    out = _to(body)
    assert out["options"] == {"num_gpu": 20, "temperature": 0.5}
    assert out["keep_alive"] == "5m"


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_request_tools_pass_through() -> None:
    assert _to(_request(tools=TOOLS))["tools"] == TOOLS


def test_request_tool_choice_none_withholds_tools() -> None:
    assert "tools" not in _to(_request(tools=TOOLS, tool_choice="none"))


def test_request_assistant_tool_calls_get_object_arguments_and_tool_results_a_name() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{not json"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "name": "explicit", "content": "21C"},
    ]
    before = copy.deepcopy(messages)
    out = _to(_request(messages=messages))["messages"]
    assert messages == before  # the input is not modified
    assert out[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_weather", "arguments": "{not json"}},
        ],
    }
    assert out[2] == {"role": "tool", "content": "18C", "tool_name": "get_weather"}
    assert out[3] == {"role": "tool", "content": "21C", "tool_name": "explicit"}


def test_request_developer_role_becomes_system() -> None:
    messages = [{"role": "developer", "content": "Be terse."}, *USER]
    assert _to(_request(messages=messages))["messages"][0]["role"] == "system"


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "json_object"}, "json"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            {"type": "object"},
        ),
        ({"type": "json_object", "schema": {"type": "object"}}, {"type": "object"}),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json"),  # no schema: any JSON
        ({"type": "text"}, None),
    ],
)
def test_request_response_format(response_format: dict[str, Any], expected: Any) -> None:
    assert _to(_request(response_format=response_format)).get("format") == expected


# -- non-stream responses -------------------------------------------------------------------


def _response(message: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "model": "qwen3:8b",
        "created_at": CREATED_AT,
        "message": {"role": "assistant", **message},
        "done": True,
        "done_reason": "stop",
        **fields,
    }


def _from(response: dict[str, Any]) -> dict[str, Any]:
    return from_ollama_chat(response, request_model="client-name", completion_id="chatcmpl-9")


def test_response_content_and_usage() -> None:
    out = _from(_response({"content": "Hello"}, prompt_eval_count=12, eval_count=3))
    assert out == {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": CREATED,
        "model": "client-name",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }


def test_response_tool_calls_get_json_string_arguments() -> None:
    calls = [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"name": "noop", "arguments": {}}},
    ]
    out = _from(_response({"content": "", "tool_calls": calls}))
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    tool_calls = choice["message"]["tool_calls"]
    assert [call["type"] for call in tool_calls] == ["function", "function"]
    assert [call["function"]["name"] for call in tool_calls] == ["get_weather", "noop"]
    assert json.loads(tool_calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert tool_calls[1]["function"]["arguments"] == "{}"
    assert all(CALL_ID.match(call["id"]) for call in tool_calls)
    assert tool_calls[0]["id"] != tool_calls[1]["id"]


@pytest.mark.parametrize(
    ("done_reason", "finish_reason"), [("stop", "stop"), ("length", "length"), (None, "stop")]
)
def test_response_finish_reason(done_reason: str | None, finish_reason: str) -> None:
    out = _from(_response({"content": "x"}, done_reason=done_reason))
    assert out["choices"][0]["finish_reason"] == finish_reason


def test_response_thinking_is_reasoning_content() -> None:
    message = _from(_response({"content": "4", "thinking": "2+2"}))["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "4", "reasoning_content": "2+2"}


@pytest.mark.parametrize(
    ("counts", "usage"),
    [
        ({}, None),
        ({"eval_count": 5}, {"prompt_tokens": 0, "completion_tokens": 5, "total_tokens": 5}),
    ],
)
def test_response_usage_only_when_counted(
    counts: dict[str, int], usage: dict[str, int] | None
) -> None:
    assert _from(_response({"content": "x"}, **counts)).get("usage") == usage


@pytest.mark.parametrize("created_at", [None, "yesterday", 5])
def test_response_unreadable_created_at_is_zero(created_at: Any) -> None:
    assert _from(_response({"content": "x"}, created_at=created_at))["created"] == 0


def test_response_error_or_no_message_is_bad_gateway() -> None:
    with pytest.raises(BadGateway, match="model not found"):
        _from({"error": "model not found"})
    with pytest.raises(BadGateway):
        _from({"done": True})


# -- streams --------------------------------------------------------------------------------


def _line(content: str = "", **fields: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": content, **fields.pop("message", {})}
    return {
        "model": "qwen3:8b",
        "created_at": CREATED_AT,
        "message": message,
        "done": False,
        **fields,
    }


def _translate(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    translator = OllamaStreamTranslator("client-name", "chatcmpl-9")
    return [chunk for line in lines for chunk in translator.translate(line)]


def _deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]


def test_stream_text() -> None:
    done = _line(done=True, done_reason="stop", prompt_eval_count=4, eval_count=2)
    chunks = _translate([_line("Hel"), _line("lo"), done])
    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-9"}
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk["model"] for chunk in chunks} == {"client-name"}
    assert {chunk["created"] for chunk in chunks} == {CREATED}
    assert _deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [
        None,
        None,
        None,
        "stop",
    ]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_stream_role_comes_first_even_on_an_empty_line() -> None:
    translator = OllamaStreamTranslator("client-name", "chatcmpl-9")
    assert _deltas(translator.translate(_line(""))) == [{"role": "assistant", "content": ""}]
    assert translator.translate(_line("")) == []


def test_stream_thinking_is_reasoning_content() -> None:
    chunks = _translate([_line("", message={"thinking": "hmm"}), _line("4")])
    assert _deltas(chunks)[1:] == [{"reasoning_content": "hmm"}, {"content": "4"}]


def test_stream_tool_calls_have_indices_ids_and_json_arguments() -> None:
    first = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    second = {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    chunks = _translate(
        [
            _line("", message={"tool_calls": [first]}),
            _line("", message={"tool_calls": [second]}),
            _line(done=True, done_reason="stop"),
        ]
    )
    deltas = _deltas(chunks)
    calls = [call for delta in deltas for call in delta.get("tool_calls", [])]
    assert [call["index"] for call in calls] == [0, 1]
    assert all(CALL_ID.match(call["id"]) for call in calls)
    assert calls[0]["id"] != calls[1]["id"]
    assert [json.loads(call["function"]["arguments"]) for call in calls] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    assert {call["type"] for call in calls} == {"function"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(chunk["choices"] for chunk in chunks)  # no counts, no usage chunk


def test_stream_done_with_length() -> None:
    chunks = _translate([_line("a"), _line(done=True, done_reason="length")])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}


def test_stream_error_line_is_bad_gateway() -> None:
    translator = OllamaStreamTranslator("client-name", "chatcmpl-9")
    translator.translate(_line("a"))
    with pytest.raises(BadGateway, match="out of memory") as caught:
        translator.translate({"error": "CUDA out of memory"})
    assert caught.value.code == "upstream_error"
    assert caught.value.status == 502
