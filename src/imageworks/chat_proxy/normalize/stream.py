"""Per-stream normalization of SSE events, cheap for the events that need nothing.

Most chunks are plain content deltas: they are recognised from their bytes and forwarded as
received. Only events that may hold a legacy `function_call`, tool calls, or (when think-tag
splitting is on) part of a `<think>` block are parsed, normalized and re-serialized.
"""

from __future__ import annotations

import json
from typing import Any

from imageworks.chat_proxy.normalize.reasoning import ThinkStreamSplitter
from imageworks.chat_proxy.normalize.tools import (
    ToolStreamNormalizer,
    may_need_tool_normalization,
)
from imageworks.chat_proxy.protocol import sse_event


class EventNormalizer:
    def __init__(self, *, tools: bool, split_think: bool) -> None:
        self._tools = ToolStreamNormalizer() if tools else None
        self._think = ThinkStreamSplitter() if split_think else None

    def process(self, event: bytes) -> bytes:
        """The event to send for `event` (the same bytes object when nothing changes)."""
        wants_tools = self._tools is not None and may_need_tool_normalization(event)
        wants_think = self._think is not None and self._think.wants(event)
        if not (wants_tools or wants_think):
            return event
        chunk = _parse_data(event)
        if chunk is None:
            return event
        result = chunk
        if self._tools is not None and wants_tools:
            result = self._tools.normalize_chunk(result)
        if self._think is not None and wants_think:
            result = self._think.normalize_chunk(result)
        return event if result is chunk else sse_event(result)

    def flush(self) -> bytes | None:
        """Text a think splitter still holds when the stream ends, as one last event."""
        if self._think is None:
            return None
        chunk = self._think.flush()
        return sse_event(chunk) if chunk is not None else None


def _parse_data(event: bytes) -> dict[str, Any] | None:
    data = event.strip()
    if not data.startswith(b"data:"):
        return None
    try:
        chunk = json.loads(data[5:])
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None
