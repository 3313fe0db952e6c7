"""The chain of steps that shape a typed request for its registry entry (`prepare_request`),
and the entry's own step: generation defaults and a default system prompt.

Each step takes the `ChatCompletionRequest` and returns it, itself when it changes nothing, a
new one (`requests.replace`) when it does; none reads the raw body. Only what the request leaves
unset is filled in from the entry; a client's explicit value always wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imageworks.chat_proxy.normalize.tools import normalize_tool_request
from imageworks.chat_proxy.normalize.vision import (
    ImagePolicy,
    has_images,
    require_vision,
    truncate_for_vision,
    validate_images,
)
from imageworks.chat_proxy.protocol import CapabilityError
from imageworks.chat_proxy.requests import ChatCompletionRequest, SystemMessage, replace
from imageworks.registry.schema import RegistryEntry

# Registry field -> request field (OpenAI names; top_k/min_tokens are vLLM/llama.cpp extensions).
SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_tokens": "max_tokens",
    "min_tokens": "min_tokens",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "stop_sequences": "stop",
}


def apply_entry_defaults(
    request: ChatCompletionRequest, entry: RegistryEntry
) -> ChatCompletionRequest:
    """`request` with the entry's generation defaults and default system prompt where unset.
    Returns `request` itself when there is nothing to add (the common, cheap case)."""
    defaults = entry.generation_defaults
    additions: dict[str, Any] = {}
    for source, target in SAMPLING_FIELDS.items():
        value = getattr(defaults, source)
        # `max_completion_tokens` is the newer spelling of the same limit.
        already = request.value(target) is not None or (
            target == "max_tokens" and request.max_completion_tokens is not None
        )
        if value is not None and value != [] and not already:
            additions[target] = value
    system_prompt = entry.metadata.get("default_system_prompt")
    messages = request.messages
    has_system = any(message.role in ("system", "developer") for message in messages)
    if isinstance(system_prompt, str) and system_prompt.strip() and not has_system:
        additions["messages"] = [SystemMessage(role="system", content=system_prompt), *messages]
    return replace(request, **additions) if additions else request


def wants_tools(request: ChatCompletionRequest) -> bool:
    return bool(request.tools) or bool(request.functions)


def require_tool_support(
    request: ChatCompletionRequest, entry: RegistryEntry, shown_name: str
) -> None:
    """Tools sent to a model whose entry says it cannot call them are refused up front (a
    model without tool support would ignore them, or its template would fail). Unknown is
    allowed: most registries never say."""
    if wants_tools(request) and entry.capability("tools") is False:
        raise CapabilityError(
            f"Model '{shown_name}' does not support tools (function calling); "
            "remove 'tools' or choose a model with the tools capability.",
            param="tools",
            code="model_lacks_tools",
        )


@dataclass(frozen=True, slots=True)
class RequestRules:
    """The settings that shape a request before it is forwarded."""

    normalize_tools: bool
    images: ImagePolicy
    truncate_vision_history: bool
    keep_system: bool
    keep_last_n_turns: int


def prepare_request(
    request: ChatCompletionRequest, entry: RegistryEntry, shown_name: str, rules: RequestRules
) -> ChatCompletionRequest:
    """Check the request against the entry and rewrite it for the backend, in order: tools,
    capabilities, images (validated, history trimmed), entry defaults. The backend's dialect
    (Ollama's native API, the served model name) is the forwarder's, from the result. Raises
    ProxyErrors. Decodes images, so callers on an event loop run it in a thread when there are
    any."""
    if rules.normalize_tools:
        request = normalize_tool_request(request)
    require_tool_support(request, entry, shown_name)
    messages = request.messages
    if has_images(messages):
        require_vision(messages, shown_name, entry.capability("vision"))
        validate_images(messages, rules.images)
        if rules.truncate_vision_history:
            trimmed = truncate_for_vision(
                messages, keep_system=rules.keep_system, keep_last_n_turns=rules.keep_last_n_turns
            )
            if trimmed is not messages:
                request = replace(request, messages=trimmed)
    return apply_entry_defaults(request, entry)
