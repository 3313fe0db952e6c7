from __future__ import annotations

import json
from typing import Any

import pytest

from imageworks.chat_proxy.normalize.request import apply_entry_defaults, require_tool_support
from imageworks.chat_proxy.protocol import CapabilityError
from imageworks.chat_proxy.requests import request_json
from imageworks.registry.schema import RegistryEntry
from support.wire import plain, typed_request

USER = [{"role": "user", "content": "hi"}]


def _entry(**fields: Any) -> RegistryEntry:
    return RegistryEntry.model_validate({"name": "m", "backend": "llamacpp", **fields})


def test_defaults_fill_only_unset_fields() -> None:
    entry = _entry(
        generation_defaults={
            "temperature": 0.2,
            "max_tokens": 48,
            "top_k": 40,
            "stop_sequences": ["</s>"],
        }
    )
    body = typed_request({"model": "m", "messages": USER, "temperature": 0.9, "top_k": None})
    assert plain(apply_entry_defaults(body, entry)) == {
        "model": "m",
        "messages": USER,
        "temperature": 0.9,  # the client's value wins
        "top_k": 40,  # null counts as unset
        "max_tokens": 48,
        "stop": ["</s>"],
    }
    assert body.value("top_k") is None  # the input is not modified
    assert "max_tokens" not in body.model_fields_set


def test_defaults_are_forwarded_and_nothing_else_is_added() -> None:
    entry = _entry(generation_defaults={"temperature": 0.2, "top_k": 40})
    body = typed_request({"model": "m", "messages": USER, "seed": 1})
    forwarded = json.loads(request_json(apply_entry_defaults(body, entry), model="served"))
    assert forwarded == {
        "model": "served",
        "messages": USER,
        "seed": 1,
        "temperature": 0.2,
        "top_k": 40,
    }


def test_max_completion_tokens_counts_as_max_tokens() -> None:
    entry = _entry(generation_defaults={"max_tokens": 48})
    body = typed_request({"model": "m", "messages": USER, "max_completion_tokens": 10})
    assert "max_tokens" not in plain(apply_entry_defaults(body, entry))


def test_nothing_to_add_returns_the_same_object() -> None:
    body = typed_request({"model": "m", "messages": USER})
    assert apply_entry_defaults(body, _entry()) is body


@pytest.mark.parametrize(
    ("messages", "added"),
    [
        (USER, True),
        ([{"role": "system", "content": "mine"}, *USER], False),
        ([{"role": "developer", "content": "mine"}, *USER], False),
    ],
)
def test_default_system_prompt_only_without_a_system_message(
    messages: list[dict[str, str]], added: bool
) -> None:
    entry = _entry(metadata={"default_system_prompt": "Be brief."})
    result = plain(apply_entry_defaults(typed_request({"model": "m", "messages": messages}), entry))
    if added:
        assert result["messages"][0] == {"role": "system", "content": "Be brief."}
        assert result["messages"][1:] == messages
    else:
        assert result["messages"] == messages


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


@pytest.mark.parametrize(
    ("capabilities", "body", "refused"),
    [
        ({"tools": False}, {"tools": TOOLS}, True),
        ({"function_calling": False}, {"functions": [{"name": "f"}]}, True),
        ({"tools": True}, {"tools": TOOLS}, False),
        ({}, {"tools": TOOLS}, False),  # unknown: allowed
        ({"tools": False}, {"tools": []}, False),  # nothing asked
    ],
)
def test_tools_need_the_tools_capability(
    capabilities: dict[str, bool], body: dict[str, Any], refused: bool
) -> None:
    entry = _entry(capabilities=capabilities)
    request = typed_request({"model": "m", "messages": USER, **body})
    if refused:
        with pytest.raises(CapabilityError) as caught:
            require_tool_support(request, entry, "m (Q4)")
        assert caught.value.status == 400
        assert caught.value.type == "capability_error"
        assert "m (Q4)" in caught.value.message
        assert "tools" in caught.value.message
    else:
        require_tool_support(request, entry, "m (Q4)")
