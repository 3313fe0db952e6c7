"""`response_format` in each server's dialect: OpenAI's forms for vLLM, llama-server and other
OpenAI servers, llama-cpp-python's json_object with a schema, Ollama's `format`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from imageworks.backends.base import Dialect
from imageworks.chat_proxy.normalize.ollama_path import needs_native_ollama
from imageworks.chat_proxy.normalize.structured import (
    ollama_format,
    structured_for,
    wants_structured_output,
)
from imageworks.chat_proxy.requests import ChatCompletionRequest, parse_chat_request
from imageworks.registry.schema import RegistryEntry

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
JSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "verdict", "strict": True, "schema": SCHEMA},
}
JSON_OBJECT = {"type": "json_object"}
LLAMA_CPP_PYTHON_SCHEMA = {"type": "json_object", "schema": SCHEMA}
OPENAI_SERVERS = (Dialect.OPENAI, Dialect.VLLM, Dialect.LLAMA_SERVER)


def request(response_format: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "verdict?"}],
        "response_format": response_format,
    }


@pytest.mark.parametrize("dialect", OPENAI_SERVERS)
@pytest.mark.parametrize("response_format", [JSON_SCHEMA, JSON_OBJECT])
def test_openai_servers_get_openai_forms_as_they_are(
    dialect: Dialect, response_format: dict[str, Any]
) -> None:
    body = request(response_format)
    assert structured_for(body, dialect) is body


@pytest.mark.parametrize("dialect", OPENAI_SERVERS)
def test_openai_servers_get_llama_cpp_python_form_as_json_schema(dialect: Dialect) -> None:
    shaped = structured_for(request(LLAMA_CPP_PYTHON_SCHEMA), dialect)
    expected = {"type": "json_schema", "json_schema": {"name": "response", "schema": SCHEMA}}
    assert shaped["response_format"] == expected


def test_llama_cpp_python_gets_json_schema_as_json_object_with_schema() -> None:
    body = request(JSON_SCHEMA)
    shaped = structured_for(body, Dialect.LLAMA_CPP_PYTHON)
    assert shaped["response_format"] == {"type": "json_object", "schema": SCHEMA}
    assert shaped["messages"] == body["messages"]
    assert body["response_format"] == JSON_SCHEMA  # the input is not changed


def test_llama_cpp_python_gets_json_object_as_it_is() -> None:
    body = request(JSON_OBJECT)
    assert structured_for(body, Dialect.LLAMA_CPP_PYTHON) is body


def test_llama_cpp_python_gets_a_schemaless_json_schema_as_json_object() -> None:
    body = request({"type": "json_schema", "json_schema": {"name": "anything"}})
    assert structured_for(body, Dialect.LLAMA_CPP_PYTHON)["response_format"] == JSON_OBJECT


@pytest.mark.parametrize(
    "response_format", [{"type": "text"}, {"type": "grammar", "grammar": "root ::= x"}, "json", 5]
)
@pytest.mark.parametrize("dialect", list(Dialect))
def test_other_response_formats_are_left_to_the_backend(
    dialect: Dialect, response_format: Any
) -> None:
    body = request(response_format)
    assert structured_for(body, dialect) is body


def test_a_request_without_response_format_is_left_as_it_is() -> None:
    body = {"model": "m", "messages": []}
    assert structured_for(body, Dialect.LLAMA_CPP_PYTHON) is body
    assert not wants_structured_output(None)


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (JSON_SCHEMA, SCHEMA),  # the schema itself
        (LLAMA_CPP_PYTHON_SCHEMA, SCHEMA),
        (JSON_OBJECT, "json"),
        ({"type": "text"}, None),
        (None, None),
    ],
)
def test_ollama_format(response_format: Any, expected: Any) -> None:
    assert ollama_format(response_format) == expected


def test_ollama_requests_are_shaped_by_the_native_translation() -> None:
    body = request(JSON_SCHEMA)
    assert structured_for(body, Dialect.OLLAMA) is body


@pytest.mark.parametrize("response_format", [JSON_SCHEMA, JSON_OBJECT])
def test_ollama_structured_output_takes_the_native_api(response_format: dict[str, Any]) -> None:
    entry = RegistryEntry(name="qwen", backend="ollama")

    def typed(response_format: dict[str, Any]) -> ChatCompletionRequest:
        return parse_chat_request(json.dumps(request(response_format)).encode())

    assert needs_native_ollama(typed(response_format), entry)
    assert not needs_native_ollama(typed({"type": "text"}), entry)
