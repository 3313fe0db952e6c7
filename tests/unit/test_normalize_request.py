from __future__ import annotations

from typing import Any

import pytest

from imageworks.chat_proxy.normalize.request import apply_entry_defaults, require_tool_support
from imageworks.chat_proxy.protocol import CapabilityError
from imageworks.registry.schema import RegistryEntry

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
    body = {"model": "m", "messages": USER, "temperature": 0.9, "top_k": None}
    assert apply_entry_defaults(body, entry) == {
        "model": "m",
        "messages": USER,
        "temperature": 0.9,  # the client's value wins
        "top_k": 40,  # null counts as unset
        "max_tokens": 48,
        "stop": ["</s>"],
    }
    assert body["top_k"] is None  # the input is not modified


def test_max_completion_tokens_counts_as_max_tokens() -> None:
    entry = _entry(generation_defaults={"max_tokens": 48})
    body = {"model": "m", "messages": USER, "max_completion_tokens": 10}
    assert "max_tokens" not in apply_entry_defaults(body, entry)


def test_nothing_to_add_returns_the_same_object() -> None:
    body = {"model": "m", "messages": USER}
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
    result = apply_entry_defaults({"model": "m", "messages": messages}, entry)
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
    request = {"model": "m", "messages": USER, **body}
    if refused:
        with pytest.raises(CapabilityError) as caught:
            require_tool_support(request, entry, "m (Q4)")
        assert caught.value.status == 400
        assert caught.value.type == "capability_error"
        assert "m (Q4)" in caught.value.message
        assert "tools" in caught.value.message
    else:
        require_tool_support(request, entry, "m (Q4)")
