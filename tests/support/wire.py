"""Typed requests from plain JSON data and back, for tests of the steps that take them."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, TypeAdapter

from imageworks.chat_proxy.requests import (
    ChatCompletionRequest,
    Message,
    as_json_data,
    parse_chat_request,
)

_MESSAGES: TypeAdapter[list[Message]] = TypeAdapter(list[Message])


def typed_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """`body` as the proxy parses it from the wire."""
    return parse_chat_request(json.dumps(body).encode())


def typed_messages(messages: list[dict[str, Any]]) -> list[Message]:
    return _MESSAGES.validate_python(messages)


def plain(value: Any) -> Any:
    """Typed values as the JSON data they stand for (set fields only)."""
    if isinstance(value, BaseModel):
        return as_json_data(value)
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value
