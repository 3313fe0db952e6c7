"""The typed chat request: one parse, errors that name the field, and a forwarded body that is
what the client sent."""

from __future__ import annotations

import json
from typing import Any

import pytest

from imageworks.chat_proxy.protocol import InvalidRequest
from imageworks.chat_proxy.requests import (
    ChatCompletionRequest,
    ImageURLPart,
    SystemMessage,
    TextPart,
    UserMessage,
    parse_chat_request,
    replace,
    request_json,
)

USER = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER], **fields}


def refusal(raw: bytes | dict[str, Any]) -> InvalidRequest:
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    with pytest.raises(InvalidRequest) as caught:
        parse_chat_request(data)
    assert (caught.value.status, caught.value.type) == (400, "invalid_request_error")
    return caught.value


# -- errors name the field and say what was expected ---------------------------------------------

FIELD_ERRORS = {
    "unknown role": (
        body(messages=[{"role": "wizard", "content": "x"}]),
        "messages[0].role",
        "invalid_value",
        "expected one of 'system', 'developer', 'user', 'assistant', 'tool', 'function', "
        "but got 'wizard'",
    ),
    "content a number": (
        body(messages=[{"role": "user", "content": 5}]),
        "messages[0].content",
        "invalid_type",
        "expected a string or an array of content parts, but got an integer instead",
    ),
    "stop a number": (
        body(stop=5),
        "stop",
        "invalid_type",
        "expected a string or an array of strings, but got an integer instead",
    ),
    "max_tokens a string": (
        body(max_tokens="abc"),
        "max_tokens",
        "invalid_type",
        "expected an integer, but got a string instead",
    ),
    "temperature a string": (
        body(temperature="hot"),
        "temperature",
        "invalid_type",
        "expected a number from 0 to 2, but got a string instead",
    ),
    "temperature too high": (
        body(temperature=2.5),
        "temperature",
        "invalid_value",
        "expected a number from 0 to 2, but got 2.5",
    ),
    "temperature a boolean": (
        body(temperature=True),
        "temperature",
        "invalid_type",
        "but got a boolean instead",
    ),
    "top_p above one": (body(top_p=1.5), "top_p", "invalid_value", "from 0 to 1"),
    "penalty below minus two": (
        body(presence_penalty=-3),
        "presence_penalty",
        "invalid_value",
        "from -2 to 2, but got -3",
    ),
    "n zero": (body(n=0), "n", "invalid_value", "expected a value of at least 1, but got 0"),
    "max_tokens a float": (body(max_tokens=1.5), "max_tokens", "invalid_type", "an integer"),
    "top_logprobs too many": (body(top_logprobs=21), "top_logprobs", "invalid_value", "at most 20"),
    "logprobs a string": (body(logprobs="yes"), "logprobs", "invalid_type", "a boolean"),
    "seed a string": (body(seed="x"), "seed", "invalid_type", "an integer"),
    "stream a string": (body(stream="yes"), "stream", "invalid_type", "a boolean"),
    "stream_options value": (
        body(stream=True, stream_options={"include_usage": "yes"}),
        "stream_options.include_usage",
        "invalid_type",
        "a boolean",
    ),
    "tool name a number": (
        body(tools=[TOOL, {"type": "function", "function": {"name": 5}}]),
        "tools[1].function.name",
        "invalid_type",
        "expected a string, but got an integer instead",
    ),
    "tool name missing": (
        body(tools=[TOOL, {"type": "function", "function": {}}]),
        "tools[1].function.name",
        "missing_required_parameter",
        "Missing required parameter: 'tools[1].function.name'.",
    ),
    "tool type": (
        body(tools=[{"type": "code", "function": TOOL["function"]}]),
        "tools[0].type",
        "invalid_value",
        "expected 'function', but got 'code'",
    ),
    "tool_choice word": (
        body(tools=[TOOL], tool_choice="sometimes"),
        "tool_choice",
        "invalid_value",
        "one of 'none', 'auto' or 'required'",
    ),
    "tool_choice a number": (body(tool_choice=1), "tool_choice", "invalid_type", "naming"),
    "part type": (
        body(
            messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "x"}]}]
        ),
        "messages[0].content[1].type",
        "invalid_value",
        "expected one of 'text', 'image_url', 'input_audio', 'file'",
    ),
    "part text a number": (
        body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        "messages[0].content[0].text",
        "invalid_type",
        "a string",
    ),
    "part without type": (
        body(messages=[{"role": "user", "content": [{"text": "a"}]}]),
        "messages[0].content[0].type",
        "missing_required_parameter",
        "Missing",
    ),
    "image part in a system message": (
        body(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": "x"}]}]),
        "messages[0].content[0].type",
        "invalid_value",
        "expected 'text', but got 'image_url'",
    ),
    "image url a number": (
        body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]),
        "messages[0].content[0].image_url",
        "invalid_type",
        "an object with a 'url' or a URL string",
    ),
    "role missing": (
        body(messages=[USER, {"content": "x"}]),
        "messages[1].role",
        "missing_required_parameter",
        "Missing required parameter: 'messages[1].role'.",
    ),
    "message not an object": (
        body(messages=["hi"]),
        "messages[0]",
        "invalid_type",
        "expected an object, but got a string instead",
    ),
    "user content missing": (
        body(messages=[{"role": "user"}]),
        "messages[0].content",
        "missing_required_parameter",
        "Missing",
    ),
    "tool result without its call id": (
        body(messages=[USER, {"role": "tool", "content": "18C"}]),
        "messages[1].tool_call_id",
        "missing_required_parameter",
        "Missing",
    ),
    "tool call arguments an object": (
        body(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}
                    ],
                },
            ]
        ),
        "messages[1].tool_calls[0].function.arguments",
        "invalid_type",
        "a string, but got an object",
    ),
    "messages empty": (
        {"model": "m", "messages": []},
        "messages",
        "invalid_value",
        "at least 1 item",
    ),
    "messages missing": ({"model": "m"}, "messages", "missing_required_parameter", "Missing"),
    "model missing": ({"messages": [USER]}, "model", "missing_required_parameter", "Missing"),
    "model empty": (body(model=""), "model", "invalid_value", "a non-empty string"),
    "model a number": (body(model=5), "model", "invalid_type", "a string"),
    "response_format type": (
        body(response_format={"type": "xml"}),
        "response_format.type",
        "invalid_value",
        "one of 'text', 'json_object', 'json_schema', 'structural_tag', but got 'xml'",
    ),
    "json_schema without a name": (
        body(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        "response_format.json_schema.name",
        "missing_required_parameter",
        "Missing",
    ),
    "logit_bias value": (
        body(logit_bias={"50256": 200}),
        "logit_bias.50256",
        "invalid_value",
        "from -100 to 100",
    ),
}


@pytest.mark.parametrize(
    ("sent", "param", "code", "said"), FIELD_ERRORS.values(), ids=FIELD_ERRORS.keys()
)
def test_parse_refuses_a_wrong_field_naming_it(
    sent: dict[str, Any], param: str, code: str, said: str
) -> None:
    error = refusal(sent)
    assert (error.param, error.code) == (param, code)
    assert said in error.message
    assert f"'{param}'" in error.message


@pytest.mark.parametrize(
    ("raw", "said"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"model": "m"}{}', "not valid JSON"),
        (b'{"model": "\\ud800", "messages": []}', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b'{"model": "m", "messages": [], "x": NaN}', "NaN and Infinity"),
        (b'{"model": "m", "messages": [], "temperature": -Infinity}', "NaN and Infinity"),
        (b"[" * 5000 + b"]" * 5000, "nested deeper than 64 levels"),
        (b'{"model": "m", "x": ' + b"[" * 65 + b"]" * 65 + b"}", "nested deeper than 64"),
        (b"[" * 100_000, "nested deeper than 64"),
    ],
)
def test_parse_refuses_what_is_not_a_json_object(raw: bytes, said: str) -> None:
    error = refusal(raw)
    assert error.param is None
    assert error.code == "invalid_json"
    assert said in error.message


def test_parse_accepts_nesting_up_to_the_bound() -> None:
    deep = {"model": "m", "messages": [USER], "x": json.loads("[" * 62 + "]" * 62)}
    assert parse_chat_request(json.dumps(deep).encode()).value("x") == deep["x"]


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = '[{"\\"' * 200
    sent = body(messages=[{"role": "user", "content": text}])
    request = parse_chat_request(json.dumps(sent).encode())
    assert request.messages[0].content == text


# -- what is forwarded is what was sent --------------------------------------------------------

SENT: dict[str, Any] = {
    "model": "client name",
    "messages": [
        {"role": "system", "content": "Be brief.", "x-note": {"kept": [1, 2.5, None]}},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "é 🐍 \u202e"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "hm",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "ok", "name": "f"},
        {"role": "function", "name": "legacy", "content": "old"},
        {"role": "developer", "content": [{"type": "text", "text": "dev"}]},
    ],
    "temperature": 1,
    "top_p": 0.5,
    "max_tokens": 12,
    "stop": ["\n"],
    "seed": 2**70,
    "stream": False,
    "stream_options": None,
    "tools": [TOOL],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    },
    # backend extensions: forwarded untouched
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.1,
    "chat_template_kwargs": {"enable_thinking": False},
    "options": {"num_gpu": 1},
    "keep_alive": "5m",
}


def test_forwarded_body_is_what_the_client_sent_but_the_model() -> None:
    request = parse_chat_request(json.dumps(SENT).encode())
    forwarded = json.loads(request_json(request, model="served-id"))
    assert forwarded == {**SENT, "model": "served-id"}


def test_forwarded_body_adds_no_nulls_or_defaults() -> None:
    sent = body(max_completion_tokens=5)
    forwarded = request_json(parse_chat_request(json.dumps(sent).encode()), model="m")
    assert json.loads(forwarded) == sent
    assert b"null" not in forwarded


def test_integers_stay_integers() -> None:
    request = parse_chat_request(json.dumps(body(temperature=1, frequency_penalty=0)).encode())
    forwarded = request_json(request, model="m")
    assert b'"temperature":1}' in forwarded
    assert b'"frequency_penalty":0,' in forwarded


def test_value_reads_declared_and_extra_fields() -> None:
    request = parse_chat_request(json.dumps(body(temperature=0.5, top_k=3)).encode())
    assert (request.value("temperature"), request.value("top_k"), request.value("nope")) == (
        0.5,
        3,
        None,
    )


def test_replace_sets_and_drops_without_touching_the_original() -> None:
    request = parse_chat_request(json.dumps(body(top_k=3, seed=1)).encode())
    changed = replace(request, drop=("top_k", "seed"), temperature=0.1, min_p=0.2)
    assert json.loads(request_json(changed, model="m")) == body(temperature=0.1, min_p=0.2)
    assert json.loads(request_json(request, model="m")) == body(top_k=3, seed=1)


def test_parts_and_messages_are_typed() -> None:
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": "https://x"}]
    request = parse_chat_request(
        json.dumps(body(messages=[{"role": "user", "content": content}])).encode()
    )
    (message,) = request.messages
    assert isinstance(message, UserMessage)
    text, image = message.content
    assert isinstance(text, TextPart)
    assert isinstance(image, ImageURLPart)
    assert image.url == "https://x"


def test_a_step_built_message_is_forwarded_with_only_its_fields() -> None:
    request = parse_chat_request(json.dumps(body()).encode())
    with_system = replace(
        request, messages=[SystemMessage(role="system", content="Be brief."), *request.messages]
    )
    forwarded = json.loads(request_json(with_system, model="m"))
    assert forwarded["messages"] == [{"role": "system", "content": "Be brief."}, USER]


def test_the_request_schema_allows_unknown_fields() -> None:
    schema = ChatCompletionRequest.model_json_schema()
    assert schema["additionalProperties"] is True
    assert schema["required"] == ["messages", "model"]
