"""What every answer carries as OpenAI sends it: the model name the client asked for, and the
nullable fields strict clients expect even when a backend leaves them out.

A whole answer is parsed anyway, so it is fixed as a dict (`complete_answer`). A stream's events
are rewritten as bytes (`ModelRenamer`): the backend writes `"model":"<served id>"` (compact or
spaced JSON) in every chunk, and the served id is known, so the field is found with a substring
search and its value replaced, without parsing the event. Only an event the cheap way cannot be
sure of is parsed: one with more than one `"model"` key.
"""

from __future__ import annotations

import json
import re
from typing import Any

from imageworks.chat_proxy.normalize.stream import event_data
from imageworks.chat_proxy.protocol import json_bytes, sse_event

_KEY = b'"model"'
_SEPARATORS = (b":", b": ")  # compact JSON (llama-server, vLLM, Go), spaced (Python's default)
# The `model` key with any JSON string value. The key's opening quote is not an escaped one
# (`\"`), and an unescaped quote cannot be inside a JSON string: this is a real key.
_MODEL_FIELD = re.compile(rb'(?<!\\)"model"(\s*:\s*)"(?:[^"\\]|\\.)*"')


def complete_answer(body: dict[str, Any], model: str | None) -> dict[str, Any]:
    """A `chat.completion` with `model` set to `model` (None: left as the backend said),
    `logprobs: null` on every choice and `refusal: null` on every assistant message that lacks
    them. Returns `body` itself when nothing changes."""
    changes: dict[str, Any] = {}
    if model is not None and body.get("model") != model:
        changes["model"] = model
    choices = body.get("choices")
    if isinstance(choices, list):
        fixed = [_choice(choice) for choice in choices]
        if any(new is not old for new, old in zip(fixed, choices, strict=True)):
            changes["choices"] = fixed
    return {**body, **changes} if changes else body


def _choice(choice: Any) -> Any:
    if not isinstance(choice, dict):
        return choice
    changes: dict[str, Any] = {}
    if "logprobs" not in choice:
        changes["logprobs"] = None
    message = choice.get("message")
    if (
        isinstance(message, dict)
        and "refusal" not in message
        and message.get("role", "assistant") == "assistant"
    ):
        changes["message"] = {**message, "refusal": None}
    return {**choice, **changes} if changes else choice


class ModelRenamer:
    """Rewrites the `model` of a stream's events from the backend's served id to `model`."""

    def __init__(self, served: str, model: str) -> None:
        self._value = json_bytes(model)  # JSON-escaped, as the field's new value
        self._model = model
        # The served id as backends encode it: UTF-8 as it is, or with \\u escapes.
        spellings = dict.fromkeys(
            [json_bytes(served), json.dumps(served).encode()]  # dict: unique, in order
        )
        self._fields = [
            (_KEY + separator + spelling, _KEY + separator + self._value)
            for separator in _SEPARATORS
            for spelling in spellings
        ]

    def event(self, event: bytes) -> bytes:
        """`event` with its `model` renamed (the same object when it has no `model`)."""
        for field, renamed in self._fields:
            at = event.find(field)
            if at < 0:
                continue
            if event.count(_KEY) != 1 or event[at - 1 : at] == b"\\":
                return self._reparsed(event)
            return event[:at] + renamed + event[at + len(field) :]
        return self._other(event)

    def _other(self, event: bytes) -> bytes:
        """An event whose `model` is not the served id as we spell it (another name, another
        escaping), or that has none."""
        count = event.count(_KEY)
        if count == 0:
            return event
        match = _MODEL_FIELD.search(event) if count == 1 else None
        if match is None:  # a nested `model`, or a value that is not a string
            return self._reparsed(event)
        renamed = _KEY + match.group(1) + self._value
        return event[: match.start()] + renamed + event[match.end() :]

    def _reparsed(self, event: bytes) -> bytes:
        chunk = event_data(event)
        if chunk is None or "model" not in chunk:
            return event
        return sse_event({**chunk, "model": self._model})
