"""When an Ollama entry goes through Ollama's native `/api/chat` instead of its `/v1`."""

from __future__ import annotations

from imageworks.chat_proxy.normalize.request import wants_tools
from imageworks.chat_proxy.normalize.structured import wants_structured_output
from imageworks.chat_proxy.normalize.vision import has_images
from imageworks.chat_proxy.requests import ChatCompletionRequest
from imageworks.registry.schema import RegistryEntry


def ollama_num_ctx(entry: RegistryEntry) -> int | None:
    """The context size the entry asks Ollama for: `--num-ctx N` in extra_args (the original
    registry's convention), else `generation_defaults.context_window`."""
    args = entry.backend_config.extra_args
    for position, arg in enumerate(args):
        flag, _, inline = arg.partition("=")
        if flag.replace("_", "-") in ("--num-ctx", "--num-context"):
            value = inline or (args[position + 1] if position + 1 < len(args) else "")
            if value.isdigit():
                return int(value)
    return entry.generation_defaults.context_window


def needs_native_ollama(request: ChatCompletionRequest, entry: RegistryEntry) -> bool:
    """Ollama's `/v1` drops what these need: inline images as raw base64, tool calls with
    object arguments, and `num_ctx`; structured output goes where Ollama takes it, as `format`
    (its `/v1` ignores a `response_format` it does not know). Everything else takes the OpenAI
    path unchanged."""
    return (
        has_images(request.messages)
        or wants_tools(request)
        or wants_structured_output(request.response_format)
        or ollama_num_ctx(entry) is not None
    )
