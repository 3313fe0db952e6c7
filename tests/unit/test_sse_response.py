"""EventStreamResponse: whatever way a stream ends, its cleanup runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from imageworks.chat_proxy.sse import EventStreamResponse


async def test_stream_sends_every_event_then_ends() -> None:
    sent: list[dict[str, Any]] = []
    closed: list[str] = []

    async def events() -> AsyncGenerator[bytes, None]:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never leaves
        return {}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def on_close() -> None:
        closed.append("closed")

    await EventStreamResponse(events(), on_close=on_close)({}, receive, send)
    assert sent[0]["status"] == 200
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert closed == ["closed"]


async def test_client_gone_before_the_first_event_still_cleans_up() -> None:
    cleaned: list[str] = []

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: never\n\n"
        finally:
            cleaned.append("generator")  # never runs: the generator never started

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise OSError("connection reset")

    async def on_close() -> None:
        cleaned.append("on_close")

    await EventStreamResponse(events(), on_close=on_close)({}, receive, send)
    assert cleaned == ["on_close"]


async def test_client_gone_mid_stream_cancels_the_generator() -> None:
    cleaned: list[str] = []
    first_sent = asyncio.Event()

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            yield b"data: 1\n\n"
            await asyncio.Event().wait()  # an upstream that goes quiet
            yield b"data: 2\n\n"
        finally:
            cleaned.append("generator")

    async def receive() -> dict[str, Any]:
        await first_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message.get("body"):
            first_sent.set()

    async def on_close() -> None:
        cleaned.append("on_close")

    await asyncio.wait_for(EventStreamResponse(events(), on_close=on_close)({}, receive, send), 5)
    assert cleaned == ["generator", "on_close"]
