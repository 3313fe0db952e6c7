"""Per-stream normalization of SSE events, cheap for the events that need nothing.

Most chunks are plain content deltas: they are recognised from their bytes and forwarded as
received. Only events that may hold a legacy `function_call`, tool calls, or (when think-tag
splitting is on) part of a `<think>` block are parsed, normalized and re-serialized.

Whether the stream is complete is judged on the events as they leave: `finished` says whether
any choice has had its `finish_reason`, and `backend_error` spots the error event a backend
sends when it gives up. Both look at the bytes first and parse only the rare event that may match.
"""

from __future__ import annotations

import re
from typing import Any

from imageworks.chat_proxy.normalize.reasoning import ThinkStreamSplitter
from imageworks.chat_proxy.normalize.tools import (
    ToolStreamNormalizer,
    may_need_tool_normalization,
)
from imageworks.chat_proxy.protocol import parse_json, sse_event

# A `finish_reason` key whose value is not null (in compact or spaced JSON). Inside a JSON
# string the quotes would be escaped, so only a real key matches; the parse confirms it is a
# choice's.
_FINISHING = re.compile(rb'"finish_reason"\s*:\s*(?!null\b)')
_ERROR_EVENT = re.compile(rb'\s*data:\s*\{\s*"error"\s*:')


class EventNormalizer:
    def __init__(self, *, tools: bool, split_think: bool) -> None:
        self._tools = ToolStreamNormalizer() if tools else None
        self._think = ThinkStreamSplitter() if split_think else None
        self.finished = False  # some choice of an event sent so far had a finish_reason

    def process(self, event: bytes) -> bytes:
        """The event to send for `event` (the same bytes object when nothing changes)."""
        sent = self._normalize(event)
        self.finished = self.finished or finishes_a_choice(sent)
        return sent

    def flush(self) -> bytes | None:
        """Text a think splitter still holds when the stream ends, as one last event."""
        if self._think is None:
            return None
        chunk = self._think.flush()
        if chunk is None:
            return None
        sent = sse_event(chunk)
        self.finished = self.finished or finishes_a_choice(sent)
        return sent

    def _normalize(self, event: bytes) -> bytes:
        wants_tools = self._tools is not None and may_need_tool_normalization(event)
        wants_think = self._think is not None and self._think.wants(event)
        if not (wants_tools or wants_think):
            return event
        chunk = event_data(event)
        if chunk is None:
            return event
        result = chunk
        if self._tools is not None and wants_tools:
            result = self._tools.normalize_chunk(result)
        if self._think is not None and wants_think:
            result = self._think.normalize_chunk(result)
        return event if result is chunk else sse_event(result)


def finishes_a_choice(event: bytes) -> bool:
    """True if a choice in this SSE event has a non-null `finish_reason`."""
    if _FINISHING.search(event) is None:
        return False
    chunk = event_data(event)
    choices = chunk.get("choices") if chunk is not None else None
    if not isinstance(choices, list):
        return False
    return any(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices)


def backend_error(event: bytes) -> dict[str, Any] | None:
    """The error object of a `data: {"error": {...}}` event (a backend giving up mid-stream)."""
    if _ERROR_EVENT.match(event) is None:
        return None
    chunk = event_data(event)
    error = chunk.get("error") if chunk is not None else None
    if isinstance(error, dict):
        return error
    return {"message": error} if isinstance(error, str) else None


def event_data(event: bytes) -> dict[str, Any] | None:
    """The JSON object of a `data:` event, or None (a comment, `[DONE]`, not an object)."""
    data = event.strip()
    if not data.startswith(b"data:"):
        return None
    try:
        chunk = parse_json(data[5:])
    except (ValueError, UnicodeDecodeError):
        return None
    return chunk if isinstance(chunk, dict) else None
