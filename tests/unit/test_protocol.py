"""protocol: a backend's errors translated (input it rejects is the client's 400, its own failures
a 502), and the JSON shape check that keeps deep nesting away from every parser."""

from __future__ import annotations

import json
from typing import Any

import pytest

from imageworks.chat_proxy.protocol import (
    BadGateway,
    BodyTooLarge,
    InvalidRequest,
    UpstreamError,
    json_shape_problem,
    upstream_error,
)

BACKEND = "llamacpp:smollm2"


def _error(message: str, type_: str = "internal_server_error") -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None}}).encode()


# What llama-cpp-python's server answers (HTTP 500) when its pydantic models reject a request:
# FastAPI's dump of the errors, then a traceback.
LLAMA_CPP_PYTHON_TOP_K = _error(
    "1 validation error:\n  {'type': 'int_parsing', 'loc': ('body', 'top_k'), 'msg': 'Input "
    "should be a valid integer, unable to parse string as an integer', 'input': 'abc'}\n\n  File "
    '"/site-packages/llama_cpp/server/app.py", line 376, in create_chat_completion\n'
)
LLAMA_CPP_PYTHON_ROLE = _error(
    "7 validation errors:\n  {'type': 'literal_error', 'loc': ('body', 'messages', 1, "
    "'ChatCompletionRequestSystemMessage', 'role'), 'msg': \"Input should be 'system'\", "
    "'input': 'wizard', 'ctx': {'expected': \"'system'\"}}\n"
)
LLAMA_CPP_PYTHON_STOP = _error(
    "2 validation errors:\n  {'type': 'string_type', 'loc': ('body', 'stop', 'str'), 'msg': "
    "'Input should be a valid string', 'input': 5}\n  {'type': 'list_type', 'loc': ('body', "
    "'stop', 'list[str]'), 'msg': 'Input should be a valid list', 'input': 5}\n"
)
LLAMA_CPP_PYTHON_BIAS = _error(
    "1 validation error:\n  {'type': 'float_parsing', 'loc': ('body', 'logit_bias', 'abc'), "
    "'msg': 'Input should be a valid number, unable to parse string as a number', 'input': 'x'}"
)
PYDANTIC_V1_FASTAPI = _error(
    "1 validation error for Request\nbody -> top_k\n  value is not a valid integer "
    "(type=type_error.integer)"
)
LLAMA_SERVER_TYPE_ERROR = json.dumps(
    {
        "error": {
            "code": 500,
            "message": "Field 'min_p': [json.exception.type_error.302] type must be number, "
            "but is string",
            "type": "server_error",
        }
    }
).encode()


@pytest.mark.parametrize(
    ("content", "param", "said"),
    [
        (LLAMA_CPP_PYTHON_TOP_K, "top_k", "Input should be a valid integer"),
        # Message indices are the backend's (the proxy may have added a system prompt).
        (LLAMA_CPP_PYTHON_ROLE, "messages", "Input should be 'system'"),
        (LLAMA_CPP_PYTHON_STOP, "stop", "Input should be a valid string"),
        (LLAMA_CPP_PYTHON_BIAS, "logit_bias.abc", "valid number"),
        (PYDANTIC_V1_FASTAPI, "top_k", "value is not a valid integer"),
        (LLAMA_SERVER_TYPE_ERROR, "min_p", "type must be number, but is string"),
    ],
)
def test_a_backend_500_blaming_the_request_is_a_400_naming_the_field(
    content: bytes, param: str, said: str
) -> None:
    error = upstream_error(500, content, BACKEND)
    assert isinstance(error, InvalidRequest)
    assert (error.status, error.type, error.code) == (
        400,
        "invalid_request_error",
        "backend_rejected_request",
    )
    assert error.param == param
    assert error.message.startswith(f"Backend {BACKEND} rejected the request: ")
    assert said in error.message
    assert "File " not in error.message  # no traceback


@pytest.mark.parametrize(
    "content",
    [
        _error("internal upstream failure", "server_error"),
        _error("llama_decode returned -1"),
        # A validation error that is not about the request body: the backend's own bug.
        _error("1 validation error for ChatCompletionResponse\nchoices\n  Field required"),
        _error("Failed to parse tool call: [json.exception.parse_error.101] syntax error"),
        b"<html><body>502 Bad Gateway</body></html>",
        b"",
    ],
)
def test_a_backend_500_of_its_own_stays_a_502(content: bytes) -> None:
    error = upstream_error(500, content, BACKEND)
    assert isinstance(error, BadGateway)
    assert (error.status, error.code) == (502, "upstream_error")


def test_a_backend_4xx_keeps_its_status_and_body() -> None:
    body: dict[str, Any] = {
        "error": {"message": "too long", "type": "invalid_request_error", "code": "ctx"}
    }
    error = upstream_error(400, json.dumps(body).encode(), BACKEND)
    assert isinstance(error, UpstreamError)
    assert error.status == 400
    assert error.body() == {"error": {**body["error"], "param": None}}


def test_body_too_large_closes_the_connection() -> None:
    error = BodyTooLarge(50_000_000)
    assert (error.status, error.code) == (413, "body_too_large")
    assert "50,000,000 bytes" in error.message
    assert "CHAT_PROXY_MAX_BODY_BYTES" in error.message
    assert error.headers() == {"Connection": "close"}


# -- json_shape_problem -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b'{"a": [1, {"b": null}]}', None),
        (b"[" * 64 + b"]" * 64, None),
        (b"[" * 65 + b"]" * 65, "it is nested deeper than 64 levels"),
        (b"{" + b'"a":{' * 64 + b"}" * 65, "it is nested deeper than 64 levels"),
        (b"[" * 5000 + b"]" * 5000, "it is nested deeper than 64 levels"),
        (b"[" * 65, "it is nested deeper than 64 levels"),  # unclosed, but too deep all the same
        (b"]" * 100 + b"[]", None),  # not JSON, but shallow: the parser says what is wrong
        (json.dumps({"text": "[" * 500 + "{" * 500}).encode(), None),  # brackets in a string
        (json.dumps(['\\"' + "[" * 100]).encode(), None),  # after escaped quotes too
        (b'{"x": NaN}', "NaN and Infinity are not JSON numbers"),
        (b'{"x": [-Infinity]}', "NaN and Infinity are not JSON numbers"),
        (b'{"x": "NaN and Infinity"}', None),
    ],
)
def test_json_shape_problem(raw: bytes, problem: str | None) -> None:
    assert json_shape_problem(raw, 64) == problem


def test_json_shape_problem_keeps_every_parser_from_recursing_too_deep() -> None:
    for depth in (65, 1_000, 100_000):
        raw = b"[" * depth + b"]" * depth
        assert json_shape_problem(raw, 64) is not None
    with pytest.raises(RecursionError):  # what it protects against
        json.loads(b"[" * 100_000 + b"]" * 100_000)
