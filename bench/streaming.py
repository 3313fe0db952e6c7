"""Streamed chat completions, one after another on one keep-alive connection: how long each event
took to get from the upstream to the client, and the time to the first token.

The bench upstream writes `time.monotonic_ns()` into each content chunk as it writes it; this
client notes `time.monotonic_ns()` when the bytes that complete an event arrive (in the
protocol's `data_received`, before any parsing), so arrival minus stamp is the event's transit
time through everything in between, on one clock. Direct to the upstream that is the loopback
and the client; through a target, the difference to direct in the same round is what the target
adds to each chunk. Transit times far below the upstream's 1 ms chunk interval also show that
each event was passed on before the next one was written (nothing buffered).

Each stream is checked: HTTP 200, every content chunk there once and in order (the stamps must
increase and there must be exactly as many as the upstream sends), a chunk with a
`finish_reason`, and `data: [DONE]` last. A stream that fails a check is an error in the
output, not a sample.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

_READ_TIMEOUT_S = 30.0


@dataclass
class StreamOutcome:
    sent_ns: int
    status: int = 0
    events: list[tuple[int, bytes]] = field(default_factory=list)  # (arrival ns, event bytes)


class _StreamProtocol(asyncio.Protocol):
    """Reads HTTP/1.1 responses (chunked or closed-delimited bodies) and cuts the body into SSE
    events, each stamped with the arrival of the bytes that completed it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self._outcome: StreamOutcome | None = None
        self._done: asyncio.Future[StreamOutcome] | None = None
        self._raw = bytearray()
        self._body = bytearray()
        self._head_done = False
        self._chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done is not None and not self._done.done():
            if self._head_done and not self._chunked and self._outcome is not None:
                self._done.set_result(self._outcome)  # the close ends the body
            else:
                self._done.set_exception(ConnectionError("the connection closed mid-response"))
        if not self.lost.done():
            self.lost.set_result(None)

    def request(self, data: bytes) -> asyncio.Future[StreamOutcome]:
        assert self.transport is not None
        self._outcome = StreamOutcome(sent_ns=time.monotonic_ns())
        self._done = asyncio.get_running_loop().create_future()
        self._raw.clear()
        self._body.clear()
        self._head_done = self._chunked = False
        self.transport.write(data)
        return self._done

    def data_received(self, data: bytes) -> None:
        arrival = time.monotonic_ns()
        if self._outcome is None or self._done is None or self._done.done():
            return  # bytes after a finished response: not ours to read
        self._raw += data
        if not self._head_done:
            head_end = self._raw.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(self._raw[:head_end]).lower()
            self._outcome.status = int(head[9:12])
            self._chunked = b"transfer-encoding: chunked" in head
            del self._raw[: head_end + 4]
            self._head_done = True
        finished = self._decode_chunks() if self._chunked else self._take_all()
        self._cut_events(arrival)
        if finished:
            self._done.set_result(self._outcome)

    def _take_all(self) -> bool:
        self._body += self._raw
        self._raw.clear()
        return False

    def _decode_chunks(self) -> bool:
        """Move whole chunks from the raw bytes to the body; True at the last chunk."""
        while True:
            line_end = self._raw.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(self._raw[:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                if self._raw.find(b"\r\n\r\n", line_end) < 0:
                    return False
                self._raw.clear()
                return True
            end = line_end + 2 + size
            if len(self._raw) < end + 2:
                return False
            self._body += self._raw[line_end + 2 : end]
            del self._raw[: end + 2]

    def _cut_events(self, arrival: int) -> None:
        assert self._outcome is not None
        while True:
            end = self._body.find(b"\n\n")
            if end < 0:
                return
            self._outcome.events.append((arrival, bytes(self._body[:end])))
            del self._body[: end + 2]


@dataclass
class StreamCheck:
    """One stream, read: its TTFT and transit times, or what was wrong with it."""

    ttft_ms: float | None
    transit_us: list[float]
    problem: str | None


def check_stream(outcome: StreamOutcome, expected_chunks: int) -> StreamCheck:
    if outcome.status != 200:
        return StreamCheck(None, [], f"HTTP {outcome.status}")
    transit: list[float] = []
    stamps: list[int] = []
    first: int | None = None
    finished = done = False
    for arrival, event in outcome.events:
        for line in event.replace(b"\r\n", b"\n").split(b"\n"):
            if not line.startswith(b"data:"):
                continue  # comments (`: keep-alive`), `event:` lines
            data = line[5:].strip()
            if done:
                return StreamCheck(None, [], "an event after [DONE]")
            if data == b"[DONE]":
                done = True
                continue
            try:
                chunk: dict[str, Any] = json.loads(data)
            except ValueError:
                return StreamCheck(None, [], f"an event that is not JSON: {data[:80]!r}")
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if not content.isdigit():
                        return StreamCheck(None, [], f"merged or changed content {content[:40]!r}")
                    stamps.append(int(content))
                    transit.append((arrival - int(content)) / 1000)
                    first = arrival if first is None else first
                if choice.get("finish_reason"):
                    finished = True
    if len(stamps) != expected_chunks:
        return StreamCheck(None, [], f"{len(stamps)} content chunks, not {expected_chunks}")
    if any(later <= earlier for earlier, later in itertools.pairwise(stamps)):
        return StreamCheck(None, [], "content chunks out of order or repeated")
    if not finished:
        return StreamCheck(None, [], "no chunk with a finish_reason")
    if not done:
        return StreamCheck(None, [], "no data: [DONE]")
    assert first is not None
    return StreamCheck((first - outcome.sent_ns) / 1e6, transit, None)


@dataclass
class StreamRun:
    streams: int
    ttft_ms: list[float]
    transit_us: list[float]
    problems: list[str]


async def run_streams(
    host: str, port: int, path: str, body: bytes, count: int, expected_chunks: int
) -> StreamRun:
    """`count` streamed requests in sequence, on one connection while the server keeps it."""
    loop = asyncio.get_running_loop()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    run = StreamRun(count, [], [], [])
    protocol: _StreamProtocol | None = None
    try:
        for _ in range(count):
            if protocol is None or protocol.lost.done():
                _, protocol = await loop.create_connection(_StreamProtocol, host, port)
            try:
                outcome = await asyncio.wait_for(protocol.request(request), _READ_TIMEOUT_S)
            except (ConnectionError, TimeoutError) as exc:
                run.problems.append(f"{type(exc).__name__}: {exc}")
                if protocol.transport is not None:
                    protocol.transport.close()
                protocol = None
                continue
            checked = check_stream(outcome, expected_chunks)
            if checked.problem is not None:
                run.problems.append(checked.problem)
                continue
            assert checked.ttft_ms is not None
            run.ttft_ms.append(checked.ttft_ms)
            run.transit_us.extend(checked.transit_us)
    finally:
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()
    return run


def stream_run(
    host: str, port: int, path: str, body: bytes, count: int, expected_chunks: int
) -> StreamRun:
    """`run_streams` on a fresh event loop (uvloop when installed)."""
    coroutine = run_streams(host, port, path, body, count, expected_chunks)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
