"""OpenAI chat requests and responses translated to and from Ollama's native `/api/chat`.

The native API is used where Ollama's `/v1` falls short: images as raw base64, tool-call
arguments as objects and a per-request `num_ctx`. Unlike the old path (behaviour spec §3.8, W8),
sampling parameters, tools, tool calls and usage survive the trip, and image URLs are refused
rather than fetched by the proxy.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from imageworks.chat_proxy.normalize.structured import ollama_format
from imageworks.chat_proxy.protocol import BadGateway, InvalidRequest
from imageworks.chat_proxy.requests import (
    AssistantMessage,
    ChatCompletionRequest,
    FunctionMessage,
    ImageURLPart,
    Message,
    RefusalPart,
    TextPart,
    ToolCall,
    ToolMessage,
    as_json_data,
)

# OpenAI request fields that Ollama's `options` take under the same name, copied when set.
_OPTIONS = ("temperature", "top_p", "top_k", "seed", "frequency_penalty", "presence_penalty")
# Ollama's own request fields, forwarded as they are when a client sends them.
_OLLAMA_EXTRAS = ("keep_alive", "think")


def to_ollama_chat(
    request: ChatCompletionRequest, *, model: str, num_ctx: int | None
) -> dict[str, Any]:
    """The `/api/chat` body for an OpenAI chat request, to be sent to `model`."""
    extras = request.model_extra or {}
    given = extras.get("options")
    options: dict[str, Any] = dict(given) if isinstance(given, dict) else {}
    options.update({name: value for name in _OPTIONS if (value := request.value(name)) is not None})
    stop = request.stop
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else list(stop)
    limit = request.max_completion_tokens
    limit = request.max_tokens if limit is None else limit
    if limit is not None:
        options["num_predict"] = limit
    if num_ctx is not None:
        options["num_ctx"] = num_ctx
    out: dict[str, Any] = {
        "model": model,
        "messages": _messages(request.messages),
        "stream": bool(request.stream),
        "options": options,
    }
    # Ollama has no tool_choice; "none" is honoured by not offering the tools at all.
    if request.tools and request.tool_choice != "none":
        out["tools"] = [as_json_data(tool) for tool in request.tools]
    response_format = request.response_format
    format_ = ollama_format(as_json_data(response_format)) if response_format else None
    if format_ is not None:
        out["format"] = format_
    out.update({key: extras[key] for key in _OLLAMA_EXTRAS if key in extras})
    return out


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    tool_names: dict[str, str] = {}  # tool_call_id -> function name, for the tool results
    out: list[dict[str, Any]] = []
    for position, message in enumerate(messages):
        text, images = _content(message.content, position)
        # Ollama knows system/user/assistant/tool: `developer` is OpenAI's new name for system,
        # and the legacy `function` role is a tool result.
        role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
        converted: dict[str, Any] = {"role": role, "content": text}
        if images:
            converted["images"] = images
        if isinstance(message, AssistantMessage) and message.tool_calls:
            converted["tool_calls"] = [_ollama_tool_call(call) for call in message.tool_calls]
            tool_names.update((call.id, call.function.name) for call in message.tool_calls)
        name: Any = None
        if isinstance(message, ToolMessage):
            name = (message.model_extra or {}).get("name") or tool_names.get(message.tool_call_id)
        elif isinstance(message, FunctionMessage):
            name = message.name
        if isinstance(name, str) and name:
            converted["tool_name"] = name
        out.append(converted)
    return out


def _content(content: str | list[Any] | None, position: int) -> tuple[str, list[str]]:
    """The text and the raw base64 images of one message's content."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    param = f"messages[{position}].content"
    texts: list[str] = []
    images: list[str] = []
    for part in content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):  # what an assistant said, all the same
            texts.append(part.refusal)
        elif isinstance(part, ImageURLPart):
            images.append(_inline_image(part.url, param))
        else:
            raise InvalidRequest(
                f"Ollama does not take content parts of type {part.type!r}", param=param
            )
    return "\n".join(texts), images


def _inline_image(url: str, param: str) -> str:
    # The proxy does not fetch URLs on a client's behalf (the old path did: SSRF, unbounded size).
    prefix, comma, payload = url.partition(",")
    if not (prefix.startswith("data:") and prefix.endswith(";base64") and comma):
        raise InvalidRequest(
            "Ollama needs images inline, as base64 data URLs (data:image/...;base64,...); "
            "the proxy does not fetch image URLs",
            param=param,
        )
    return payload


def _ollama_tool_call(call: ToolCall) -> dict[str, Any]:
    arguments: Any = call.function.arguments
    try:
        parsed: Any = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        parsed = arguments  # not JSON: Ollama will say so, with the text the model wrote
    arguments = parsed if isinstance(parsed, dict) else arguments
    return {"function": {"name": call.function.name, "arguments": arguments}}


def from_ollama_chat(
    response: dict[str, Any], *, request_model: str, completion_id: str
) -> dict[str, Any]:
    """The OpenAI `chat.completion` for a non-streamed `/api/chat` response."""
    _raise_on_error(response)
    message = response.get("message")
    if not isinstance(message, dict):
        raise BadGateway("Ollama answered without a message", code="upstream_error")
    out_message: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("thinking"):
        out_message["reasoning_content"] = message["thinking"]
    calls = _openai_tool_calls(message.get("tool_calls"), completion_id, 0)
    if calls:
        out_message["tool_calls"] = calls
    out: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": _created(response.get("created_at")),
        "model": request_model,
        "choices": [
            {
                "index": 0,
                "message": out_message,
                "finish_reason": _finish_reason(response, has_tool_calls=bool(calls)),
            }
        ],
    }
    usage = _usage(response)
    if usage is not None:
        out["usage"] = usage
    return out


class OllamaStreamTranslator:
    """One Ollama NDJSON stream turned into OpenAI `chat.completion.chunk`s with one id."""

    def __init__(self, request_model: str, completion_id: str) -> None:
        self._model = request_model
        self._id = completion_id
        self._created: int | None = None
        self._tool_calls = 0  # tool calls so far: the next call's index

    def translate(self, line: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks for one stream object (none for an empty keep-going line)."""
        _raise_on_error(line)
        chunks: list[dict[str, Any]] = []
        if self._created is None:
            self._created = _created(line.get("created_at"))
            chunks.append(self._chunk({"role": "assistant", "content": ""}))
        message = line.get("message")
        message = message if isinstance(message, dict) else {}
        delta: dict[str, Any] = {}
        if message.get("thinking"):
            delta["reasoning_content"] = message["thinking"]
        if message.get("content"):
            delta["content"] = message["content"]
        calls = _openai_tool_calls(message.get("tool_calls"), self._id, self._tool_calls)
        if calls:
            # Ollama sends each call whole, so one delta carries its id, name and arguments.
            first = self._tool_calls
            delta["tool_calls"] = [{"index": first + i, **call} for i, call in enumerate(calls)]
            self._tool_calls += len(calls)
        if delta:
            chunks.append(self._chunk(delta))
        if line.get("done"):
            finish = _finish_reason(line, has_tool_calls=self._tool_calls > 0)
            chunks.append(self._chunk({}, finish_reason=finish))
            usage = _usage(line)
            # Always sent: the proxy drops it unless the client set stream_options.include_usage.
            if usage is not None:
                chunks.append({**self._chunk({}), "choices": [], "usage": usage})
        return chunks

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created or 0,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }


def _raise_on_error(line: dict[str, Any]) -> None:
    if line.get("error"):
        raise BadGateway(f"Ollama error: {line['error']}", code="upstream_error")


def _openai_tool_calls(calls: Any, completion_id: str, first: int) -> list[dict[str, Any]]:
    """Ollama tool calls as OpenAI ones: arguments as a JSON string, and an id made from the
    completion id and the call's position, so it is unique and the translation stays pure."""
    if not isinstance(calls, list):
        return []
    out: list[dict[str, Any]] = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        digest = hashlib.sha256(f"{completion_id}:{first + len(out)}".encode()).hexdigest()
        out.append(
            {
                "id": f"call_{digest[:24]}",
                "type": "function",
                "function": {"name": str(function.get("name", "")), "arguments": arguments},
            }
        )
    return out


def _finish_reason(line: dict[str, Any], *, has_tool_calls: bool) -> str:
    if has_tool_calls:
        return "tool_calls"
    return "length" if line.get("done_reason") == "length" else "stop"


def _usage(line: dict[str, Any]) -> dict[str, int] | None:
    prompt, completion = line.get("prompt_eval_count"), line.get("eval_count")
    if not isinstance(prompt, int) and not isinstance(completion, int):
        return None
    # Ollama leaves out prompt_eval_count when the whole prompt came from its cache.
    prompt = prompt if isinstance(prompt, int) else 0
    completion = completion if isinstance(completion, int) else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _created(created_at: Any) -> int:
    """Unix seconds from Ollama's RFC 3339 `created_at`; 0 when missing or unreadable."""
    if not isinstance(created_at, str):
        return 0
    try:
        return int(datetime.fromisoformat(created_at).timestamp())
    except ValueError:
        return 0
