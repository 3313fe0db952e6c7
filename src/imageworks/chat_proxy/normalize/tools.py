"""Tool calls in OpenAI's `tool_calls` shape, whatever the backend sent.

Backends disagree: some answer with the legacy `function_call`, Ollama gives `arguments` as an
object, others leave out a call's `id`, `type` or stream `index`. Clients (the OpenAI SDK, Open
WebUI) understand only `tool_calls` with string arguments and one id per call.

Nothing is guessed: assistant text stays as it is even when it looks like JSON (a JSON answer is an
answer, not a tool call), and arguments are serialized with `json.dumps`, never `str()`.

Every function returns its input itself when nothing needs changing (the proxy's common case) and
copies what it changes, so the input is never mutated. Responses are JSON data (dicts) as the
backend sent them; requests are the typed `ChatCompletionRequest`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from imageworks.chat_proxy.requests import (
    ChatCompletionRequest,
    FunctionName,
    NamedToolChoice,
    Tool,
    replace,
)

JsonDict = dict[str, Any]
IdFactory = Callable[[], str]

# A JSON key or string value spelled exactly so: its opening quote is not an escaped one (`\"`).
_TOOL_KEY = re.compile(rb'(?<!\\)"(?:tool_calls|function_call)"')
_LEGACY_REQUEST_KEYS = frozenset({"functions", "function_call"})


def new_call_id() -> str:
    """A fresh tool call id in OpenAI's format: `call_` and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


def may_need_tool_normalization(event: bytes) -> bool:
    """Whether a raw SSE event may need `ToolStreamNormalizer`; false means forward it untouched.

    Rule: the bytes contain `"tool_calls"` or `"function_call"` (with the quotes) whose opening
    quote is not preceded by a backslash, i.e. a JSON key or string equal to either name. Whitespace
    cannot occur inside a key, and the same words quoted inside assistant text are escaped
    (`\\"tool_calls\\"`), so they do not count. Keys spelled with `\\u` escapes are not recognized.
    """
    if b"tool_calls" not in event and b"function_call" not in event:
        return False  # the usual content chunk: two substring scans, no regex
    return _TOOL_KEY.search(event) is not None


def _map_same(items: list[Any], transform: Callable[[int, Any], Any]) -> list[Any]:
    """`transform(position, item)` over `items`; `items` itself when no element changed."""
    mapped = [transform(position, item) for position, item in enumerate(items)]
    return items if all(new is old for new, old in zip(mapped, items, strict=True)) else mapped


def _with(data: JsonDict, changes: JsonDict, drop: str | None = None) -> JsonDict:
    """A copy of `data` with `changes` (and without `drop`); `data` itself when nothing changes."""
    if not changes and (drop is None or drop not in data):
        return data
    return {**{key: value for key, value in data.items() if key != drop}, **changes}


def _arguments_text(value: Any, if_none: str) -> str:
    """Tool call arguments as the JSON text clients expect (Ollama sends an object)."""
    if isinstance(value, str):
        return value
    return if_none if value is None else json.dumps(value, ensure_ascii=False)


def _finish_change(choice: JsonDict) -> JsonDict:
    return {"finish_reason": "tool_calls"} if choice.get("finish_reason") == "function_call" else {}


# ---------------------------------------------------------------- whole responses


def normalize_completion(body: JsonDict, *, new_id: IdFactory = new_call_id) -> JsonDict:
    """A `chat.completion` body whose tool calls all have OpenAI's shape."""
    choices = body.get("choices")
    if not isinstance(choices, list):
        return body
    new_choices = _map_same(choices, lambda _, choice: _completion_choice(choice, new_id))
    return _with(body, {} if new_choices is choices else {"choices": new_choices})


def _completion_choice(choice: Any, new_id: IdFactory) -> Any:
    if not isinstance(choice, dict):
        return choice
    changes = _finish_change(choice)
    message = choice.get("message")
    if isinstance(message, dict) and (new_message := _message(message, new_id)) is not message:
        changes["message"] = new_message
    return _with(choice, changes)


def _message(message: JsonDict, new_id: IdFactory) -> JsonDict:
    legacy = message.get("function_call")
    calls = message.get("tool_calls")
    if not isinstance(legacy, dict):
        legacy = None  # `null` (or junk) is left where it is
    elif not calls:
        calls = [{"id": new_id(), "type": "function", "function": legacy}]
    # With both present the legacy key is taken to duplicate `tool_calls`, which wins.
    if isinstance(calls, list):
        calls = _map_same(calls, lambda _, call: _whole_call(call, new_id))
    changes = {} if calls is message.get("tool_calls") else {"tool_calls": calls}
    return _with(message, changes, drop="function_call" if legacy is not None else None)


def _whole_call(call: Any, new_id: IdFactory) -> Any:
    if not isinstance(call, dict):
        return call
    changes: JsonDict = {}
    if not call.get("id"):
        changes["id"] = new_id()
    if not call.get("type"):
        changes["type"] = "function"
    function = call.get("function")
    arguments = function.get("arguments") if isinstance(function, dict) else ""
    if isinstance(function, dict) and not isinstance(arguments, str):
        # Missing or null arguments mean "no arguments"; clients json-parse this string.
        changes["function"] = {**function, "arguments": _arguments_text(arguments, "{}")}
    return _with(call, changes)


# ---------------------------------------------------------------- requests


def normalize_tool_request(request: ChatCompletionRequest) -> ChatCompletionRequest:
    """A chat request with legacy `functions` turned into `tools`, and no empty tool list.

    Several backends reject `tools: []`, and a `tool_choice` or `parallel_tool_calls` without tools.
    """
    result = request
    if not _LEGACY_REQUEST_KEYS.isdisjoint(request.model_fields_set):
        result = _from_legacy_request(request)
    if "tools" in result.model_fields_set and not result.tools:
        result = replace(result, drop=("tools", "tool_choice", "parallel_tool_calls"))
    return result


def _from_legacy_request(request: ChatCompletionRequest) -> ChatCompletionRequest:
    functions = request.functions
    if request.tools or not functions:
        return replace(request, drop=_LEGACY_REQUEST_KEYS)  # modern keys win
    changes: JsonDict = {"tools": [Tool(type="function", function=f) for f in functions]}
    choice = request.function_call
    if choice is not None and "tool_choice" not in request.model_fields_set:
        # "auto" and "none" mean the same in both APIs.
        changes["tool_choice"] = (
            choice
            if isinstance(choice, str)
            else NamedToolChoice(type="function", function=FunctionName(name=choice.name))
        )
    return replace(request, drop=_LEGACY_REQUEST_KEYS, **changes)


# ---------------------------------------------------------------- streams


class ToolStreamNormalizer:
    """Normalizes one stream's `chat.completion.chunk`s; create one per stream.

    The OpenAI SDK merges tool call fragments by `index` and concatenates their string fields, so
    each call must get its id (and name) on its first fragment only, and the same index throughout.
    That is the state kept here, per choice index.
    """

    def __init__(self, new_id: IdFactory = new_call_id) -> None:
        self._new_id = new_id
        self._started: set[tuple[int, int]] = set()  # (choice, tool index) seen at least once
        self._index_of_id: dict[tuple[int, str], int] = {}
        self._next_index: dict[int, int] = {}  # per choice: one past the highest tool index
        self._last_index: dict[int, int] = {}  # per choice: the index of the latest fragment
        self._legacy_named: set[int] = set()  # choices whose legacy call has sent its name

    def normalize_chunk(self, chunk: JsonDict) -> JsonDict:
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return chunk
        new_choices = _map_same(choices, self._choice)
        return _with(chunk, {} if new_choices is choices else {"choices": new_choices})

    def _choice(self, position: int, choice: Any) -> Any:
        if not isinstance(choice, dict):
            return choice
        index = choice.get("index")
        choice_index = index if isinstance(index, int) else position
        changes = _finish_change(choice)
        delta = choice.get("delta")
        if isinstance(delta, dict) and (new_delta := self._delta(choice_index, delta)) is not delta:
            changes["delta"] = new_delta
        return _with(choice, changes)

    def _delta(self, choice: int, delta: JsonDict) -> JsonDict:
        legacy = delta.get("function_call")
        calls = delta.get("tool_calls")
        new_calls = calls
        if isinstance(legacy, dict) and not calls:
            new_calls = [self._legacy_fragment(choice, legacy)]
        elif isinstance(calls, list):
            new_calls = _map_same(calls, lambda i, call: self._fragment(choice, i, call))
        changes = {} if new_calls is calls else {"tool_calls": new_calls}
        return _with(delta, changes, drop="function_call" if isinstance(legacy, dict) else None)

    def _legacy_fragment(self, choice: int, legacy: JsonDict) -> JsonDict:
        # The legacy API has one call per choice, so it is always tool index 0.
        function: JsonDict = {}
        if legacy.get("name") and choice not in self._legacy_named:
            self._legacy_named.add(choice)
            function["name"] = legacy["name"]
        function["arguments"] = _arguments_text(legacy.get("arguments"), "")
        if (choice, 0) in self._started:
            return {"index": 0, "function": function}
        self._started.add((choice, 0))
        return {"index": 0, "id": self._new_id(), "type": "function", "function": function}

    def _fragment(self, choice: int, position: int, fragment: Any) -> Any:
        if not isinstance(fragment, dict):
            return fragment
        changes: JsonDict = {}
        call_id = fragment.get("id")
        call_id = call_id if isinstance(call_id, str) and call_id else None
        index = fragment.get("index")
        if not isinstance(index, int):
            index = self._guess_index(choice, position, call_id, fragment)
            changes["index"] = index
        if (choice, index) not in self._started:
            self._started.add((choice, index))
            if call_id is None:
                changes["id"] = self._new_id()
            if not fragment.get("type"):
                changes["type"] = "function"
        if call_id is not None:
            self._index_of_id.setdefault((choice, call_id), index)
        self._next_index[choice] = max(self._next_index.get(choice, 0), index + 1)
        self._last_index[choice] = index
        function = fragment.get("function")
        if isinstance(function, dict):
            arguments = function.get("arguments")
            if arguments is not None and not isinstance(arguments, str):
                changes["function"] = {**function, "arguments": _arguments_text(arguments, "")}
        return _with(fragment, changes)

    def _guess_index(self, choice: int, position: int, call_id: str | None, call: JsonDict) -> int:
        """The index of a fragment that has none: a known id keeps its index, a new call (an id
        or a name) takes the next free one, anything else continues the latest call."""
        if call_id is not None and (choice, call_id) in self._index_of_id:
            return self._index_of_id[(choice, call_id)]
        function = call.get("function")
        if call_id is not None or (isinstance(function, dict) and function.get("name")):
            return self._next_index.get(choice, 0)
        return self._last_index.get(choice, position)
