"""The served OpenAPI document tells the truth: the routes the app serves, the typed request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from imageworks.chat_proxy.app import VERSION, create_app
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.endpoint_requests import (
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
)
from imageworks.chat_proxy.openapi import openapi_document
from imageworks.chat_proxy.requests import ChatCompletionRequest
from imageworks.config import RegistrySettings


@pytest.fixture
def app(tmp_path: Path) -> Starlette:
    settings = ProxySettings(log_path=tmp_path / "log.jsonl")  # the app is built, not started
    return create_app(settings, RegistrySettings(registry_dir=tmp_path))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_the_document_has_every_route_the_app_serves_and_nothing_else(app: Starlette) -> None:
    # The route table is an independent account of what the app serves (HEAD comes with GET;
    # the routes outside the API say so).
    served = {
        (method.lower(), route.path.replace(":path}", "}"))
        for route in app.routes
        if isinstance(route, Route) and route.include_in_schema
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert ("post", "/v1/chat/completions") in served
    paths = openapi_document(VERSION)["paths"]
    documented = {(method, path) for path, item in paths.items() for method in item}
    assert documented == served


def test_the_app_serves_the_document(app: Starlette) -> None:
    response = TestClient(app, base_url="http://127.0.0.1").get("/v1/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == json.loads(json.dumps(openapi_document(VERSION)))


def test_every_reference_resolves() -> None:
    document = openapi_document("0")
    schemas = document["components"]["schemas"]
    refs = set(_refs(document))
    assert refs
    assert {ref.removeprefix("#/components/schemas/") for ref in refs} <= set(schemas)


def test_the_request_schema_is_the_typed_request() -> None:
    request = openapi_document("0")["components"]["schemas"]["ChatCompletionRequest"]
    fields = ChatCompletionRequest.model_fields
    assert list(request["properties"]) == [f.alias or name for name, f in fields.items()]
    assert request["required"] == ["messages", "model"]
    assert request["additionalProperties"] is True  # unknown fields are forwarded


def test_every_operation_answers_errors_in_the_one_envelope() -> None:
    document = openapi_document("0")
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    for item in document["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.mark.parametrize(
    ("path", "schema", "model", "streams"),
    [
        ("/v1/completions", "CompletionRequest", CompletionRequest, True),
        ("/v1/embeddings", "EmbeddingRequest", EmbeddingRequest, False),
        ("/v1/responses", "ResponsesRequest", ResponsesRequest, True),
    ],
)
def test_each_model_endpoint_is_documented_with_its_typed_request(
    path: str, schema: str, model: type[BaseModel], streams: bool
) -> None:
    document = openapi_document("0")
    operation = document["paths"][path]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{schema}"}
    request = document["components"]["schemas"][schema]
    assert list(request["properties"]) == [f.alias or n for n, f in model.model_fields.items()]
    assert request["required"][:1] == ["model"]
    assert request["additionalProperties"] is True  # unknown fields are forwarded
    answers = set(operation["responses"]["200"]["content"])
    assert answers == (
        {"application/json", "text/event-stream"} if streams else {"application/json"}
    )
    assert "unsupported_endpoint" in operation["description"]
