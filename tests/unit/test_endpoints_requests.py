"""The bodies of /v1/completions, /v1/embeddings and /v1/responses: light, exact checks that
name the field, and everything else forwarded as sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from imageworks.chat_proxy.endpoint_requests import (
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
    wire_json,
)
from imageworks.chat_proxy.passthrough import CompletionsFlow
from imageworks.chat_proxy.protocol import InvalidRequest
from imageworks.chat_proxy.requests import parse_request
from imageworks.registry.schema import RegistryEntry

Model = type[CompletionRequest] | type[EmbeddingRequest] | type[ResponsesRequest]


def _parse(model: Model, body: Any) -> Any:
    return parse_request(json.dumps(body).encode(), model)


def _refused(model: Model, body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        _parse(model, body)
    return caught.value


@pytest.mark.parametrize("prompt", ["Once upon", ["a", "b"], [1, 2, 3], [[1, 2], [3]]], ids=str)
def test_a_prompt_takes_each_of_openais_shapes(prompt: Any) -> None:
    assert _parse(CompletionRequest, {"model": "m", "prompt": prompt}).prompt == prompt


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": "x"}, "model", "missing_required_parameter"),
        ({"model": "m"}, "prompt", "missing_required_parameter"),
        ({"model": "m", "prompt": 3}, "prompt", "invalid_type"),
        ({"model": "m", "prompt": ["a", 1]}, "prompt[1]", "invalid_type"),
        ({"model": "m", "prompt": [1, -2]}, "prompt[1]", "invalid_value"),
        ({"model": "m", "prompt": [[1], ["x"]]}, "prompt[1][0]", "invalid_type"),
        ({"model": "m", "prompt": []}, "prompt", "invalid_value"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream", "invalid_type"),
        ({"model": "m", "prompt": "x", "temperature": 3}, "temperature", "invalid_value"),
        ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"model": "", "prompt": "x"}, "model", "invalid_value"),
    ],
)
def test_a_bad_completion_body_is_a_400_naming_the_field(
    body: dict[str, Any], param: str, code: str
) -> None:
    error = _refused(CompletionRequest, body)
    assert (error.status, error.param, error.code) == (400, param, code)
    assert param in error.message


def test_a_prompt_of_the_wrong_kind_says_what_is_expected() -> None:
    error = _refused(CompletionRequest, {"model": "m", "prompt": {"text": "x"}})
    assert "a string, an array of strings, an array of token ids or an array of token arrays" in (
        error.message
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "input"),
        ({"input": "x"}, "model"),
        ({"model": "m", "input": None}, "input"),
        ({"model": "m", "input": ["a", None]}, "input[1]"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_a_bad_embedding_body_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    error = _refused(EmbeddingRequest, body)
    assert (error.status, error.param) == (400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "input"),
        ({"input": "x"}, "model"),
        ({"model": "m", "input": 7}, "input"),
        ({"model": "m", "input": ["not an item"]}, "input[0]"),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "stream": 1}, "stream"),
    ],
)
def test_a_bad_responses_body_is_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    error = _refused(ResponsesRequest, body)
    assert (error.status, error.param) == (400, param)


def test_not_json_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(b"{nope", EmbeddingRequest)
    assert caught.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (CompletionRequest, {"model": "m", "prompt": [1, 2], "top_k": 3, "cache_prompt": True}),
        (EmbeddingRequest, {"model": "m", "input": ["a"], "encoding_format": "base64", "x": [1]}),
        (ResponsesRequest, {"model": "m", "input": [{"role": "user", "content": "hi"}], "k": 1}),
    ],
    ids=["completion", "embedding", "responses"],
)
def test_the_backend_gets_what_was_sent_with_its_served_model(
    model: Model, body: dict[str, Any]
) -> None:
    forwarded = json.loads(wire_json(_parse(model, body), model="served-id"))
    assert forwarded == {**body, "model": "served-id"}  # extras kept, no nulls added


def test_an_embedding_request_never_streams() -> None:
    assert _parse(EmbeddingRequest, {"model": "m", "input": "x", "stream": True}).stream is False


async def test_a_completion_takes_the_entrys_sampling_defaults_where_unset(tmp_path: Path) -> None:
    entry = RegistryEntry.model_validate(
        {
            "name": "m",
            "backend": "llamacpp",
            "generation_defaults": {"max_tokens": 48, "temperature": 0.7, "top_k": 40},
        }
    )
    flow = CompletionsFlow(None, log_prompts=False, rename=True)  # type: ignore[arg-type]
    body = _parse(CompletionRequest, {"model": "m", "prompt": "x", "temperature": 0})
    prepared = await flow.prepare(body, entry, tmp_path)
    forwarded = json.loads(wire_json(prepared, model="served"))
    # The client's temperature wins; what it left unset comes from the entry.
    assert forwarded == {
        "model": "served",
        "prompt": "x",
        "temperature": 0,
        "max_tokens": 48,
        "top_k": 40,
    }
    assert json.loads(wire_json(body, model="served")) == {  # the parsed request is untouched
        "model": "served",
        "prompt": "x",
        "temperature": 0,
    }
