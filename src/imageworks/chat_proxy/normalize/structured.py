"""Structured output (`response_format`) in the form the answering server understands.

Clients send OpenAI's forms, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
{"name", "schema", "strict"}}`, or now and then llama-cpp-python's `{"type": "json_object",
"schema": S}`. Each server takes one of them:

    vLLM, native llama-server, other OpenAI servers   OpenAI's forms, as they are
    llama-cpp-python                                  {"type": "json_object", "schema": S}
                                                      (it answers json_schema with a 500)
    Ollama                                            `format`: the schema itself, or "json", on
                                                      its native /api/chat (`to_ollama_chat`)

Pure: dicts in, dicts out; a request that needs no change is returned as it is. Anything else in
`response_format` (`text`, an unknown type, a malformed value) is left for the backend to judge.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from imageworks.backends.base import Dialect
from imageworks.chat_proxy.requests import as_json_data

JsonDict = dict[str, Any]
ANY_JSON = "json"  # JSON without a schema


def requested_json(response_format: Any) -> JsonDict | str | None:
    """The JSON an answer must be: its schema, `ANY_JSON`, or None when no JSON is asked for."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        schema = response_format.get("schema")  # llama-cpp-python's form
        return schema if isinstance(schema, dict) else ANY_JSON
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else ANY_JSON
    return None


def wants_structured_output(response_format: BaseModel | None) -> bool:
    """A request's (typed) `response_format` asks for JSON."""
    return response_format is not None and requested_json(as_json_data(response_format)) is not None


def structured_for(body: JsonDict, dialect: Dialect) -> JsonDict:
    """`body` with its `response_format` in the form `dialect` takes (Ollama's is built by
    `to_ollama_chat` from `ollama_format`, so its requests are left as they are)."""
    current = body.get("response_format")
    wanted = requested_json(current)
    if wanted is None or dialect is Dialect.OLLAMA:
        return body
    if dialect is Dialect.LLAMA_CPP_PYTHON:
        shaped: JsonDict = {"type": "json_object"}
        if wanted != ANY_JSON:
            shaped["schema"] = wanted
    elif _is_openai_form(current):
        return body
    elif wanted == ANY_JSON:
        shaped = {"type": "json_object"}
    else:  # llama-cpp-python's form, sent to a server that speaks OpenAI's
        shaped = {"type": "json_schema", "json_schema": {"name": "response", "schema": wanted}}
    return body if shaped == current else {**body, "response_format": shaped}


def ollama_format(response_format: Any) -> JsonDict | str | None:
    """Ollama's `format` for a `response_format`: the schema itself, "json", or None."""
    return requested_json(response_format)


def _is_openai_form(response_format: Any) -> bool:
    """OpenAI's json_schema, or a json_object without llama-cpp-python's `schema`."""
    if not isinstance(response_format, dict):
        return False
    return response_format.get("type") == "json_schema" or "schema" not in response_format
