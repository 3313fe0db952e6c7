"""The drain's HTTP protocol on a real uvicorn server and real sockets: once shutdown begins,
every request a kept-alive client sends is answered with `Connection: close`, and a connection
is closed only when quiet, with a FIN, never a reset."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import uvicorn

from imageworks.chat_proxy.draining import Drain, unread_bytes

pytestmark = pytest.mark.timeout(10)

QUIET_S = 0.3


@dataclass
class App:
    """`/fast` answers at once; `/slow` once `gate` is set; `/stream` sends its headers and a
    first chunk, and its last once `gate` is set. `arrived` is set when a slow one has begun."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        path = scope["path"]
        if path == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first,", "more_body": True})
            self.arrived.set()
            await self.gate.wait()
            await send({"type": "http.response.body", "body": b"last"})
            return
        if path == "/slow":
            self.arrived.set()
            await self.gate.wait()
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})


class DrainingServer(uvicorn.Server):
    """As app.py's server: the drain begins before uvicorn tells the connections."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self.shutting_down = asyncio.Event()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.drain.begin()
        self.shutting_down.set()
        await super().shutdown(sockets)


@dataclass
class Served:
    port: int
    server: DrainingServer
    finished: asyncio.Task[None]

    async def begin_shutdown(self) -> None:
        self.server.should_exit = True
        await self.server.shutting_down.wait()


@contextlib.asynccontextmanager
async def serving(app: App) -> AsyncIterator[Served]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    drain = Drain(quiet_s=QUIET_S)
    config = uvicorn.Config(
        app, http=drain.protocol, lifespan="off", log_level="warning", log_config=None
    )
    server = DrainingServer(config, drain)
    finished = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield Served(sock.getsockname()[1], server, finished)
    finally:
        app.gate.set()
        server.should_exit = True
        await asyncio.wait_for(finished, timeout=5)


class Client:
    """One kept-alive HTTP/1.1 connection, read by h11."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.http = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send(self, path: str) -> None:
        if self.http.our_state is h11.DONE:
            self.http.start_next_cycle()
        request = h11.Request(method="GET", target=path, headers=[("host", "test")])
        self.writer.write(self.http.send(request) + (self.http.send(h11.EndOfMessage()) or b""))

    async def head(self) -> dict[str, str]:
        event = await self._next(h11.Response)
        assert event.status_code == 200
        return {name.decode(): value.decode() for name, value in event.headers}

    async def rest(self) -> bytes:
        body = b""
        while not isinstance(
            event := await self._next(h11.Data, h11.EndOfMessage), h11.EndOfMessage
        ):
            body += event.data
        return body

    async def answer(self, path: str) -> tuple[dict[str, str], bytes]:
        self.send(path)
        return await self.head(), await self.rest()

    async def closed_cleanly(self) -> bool:
        """True on a FIN (end of stream); False on a reset or more bytes."""
        try:
            return await self.reader.read(1) == b""
        except ConnectionResetError:
            return False

    async def _next(self, *kinds: type[Any]) -> Any:
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                self.http.receive_data(await self.reader.read(65536))
            elif isinstance(event, kinds):
                return event


async def test_drain_answers_a_request_sent_on_an_idle_connection_then_closes_cleanly() -> None:
    async with serving(App()) as served:
        client = await Client.connect(served.port)
        headers, _ = await client.answer("/fast")
        assert "connection" not in headers  # kept alive
        await served.begin_shutdown()
        headers, body = await client.answer("/fast")  # as the drain closes idle connections
        assert (headers["connection"], body) == ("close", b"ok")
        assert await client.closed_cleanly()
        await asyncio.wait_for(served.finished, timeout=5)


async def test_drain_closes_a_quiet_connection_cleanly_once_quiet_for_the_quiet_period() -> None:
    async with serving(App()) as served:
        answered = await Client.connect(served.port)
        await answered.answer("/fast")
        answered_at = time.monotonic()
        silent = await Client.connect(served.port)  # never sends a byte
        connected_at = time.monotonic()
        await served.begin_shutdown()
        assert await answered.closed_cleanly()
        assert time.monotonic() - answered_at > QUIET_S - 0.1  # not at once
        assert await silent.closed_cleanly()
        assert QUIET_S - 0.1 < time.monotonic() - connected_at < QUIET_S + 2
        await asyncio.wait_for(served.finished, timeout=5)


async def test_drain_ends_an_answer_not_yet_begun_with_connection_close() -> None:
    app = App()
    async with serving(app) as served:
        client = await Client.connect(served.port)
        client.send("/slow")
        await app.arrived.wait()
        await served.begin_shutdown()
        app.gate.set()
        assert (await client.head())["connection"] == "close"
        assert await client.rest() == b"ok"
        assert await client.closed_cleanly()


async def test_drain_serves_the_request_after_a_stream_whose_headers_promised_keep_alive() -> None:
    app = App()
    async with serving(app) as served:
        client = await Client.connect(served.port)
        client.send("/stream")
        assert "connection" not in await client.head()
        await app.arrived.wait()
        await served.begin_shutdown()
        app.gate.set()
        assert await client.rest() == b"first,last"
        headers, body = await client.answer("/fast")  # at once, as a kept-alive client does
        assert (headers["connection"], body) == ("close", b"ok")
        assert await client.closed_cleanly()


async def test_drain_waits_for_a_request_whose_head_is_half_sent() -> None:
    async with serving(App()) as served:
        client = await Client.connect(served.port)
        client.writer.write(b"GET /fast HTTP/1.1\r\nhost: te")
        await asyncio.sleep(0.05)
        await served.begin_shutdown()
        await asyncio.sleep(QUIET_S * 2)  # longer than a quiet connection is kept
        client.writer.write(b"st\r\n\r\n")
        assert (await client.head())["connection"] == "close"
        assert await client.rest() == b"ok"
        assert await client.closed_cleanly()


async def test_drain_applies_to_a_connection_made_after_it_began() -> None:
    # asyncio makes an accepted connection a turn of the loop later: one accepted just before
    # the listener closed meets the drain already begun, and was never told by uvicorn.
    async with serving(App()) as served:
        served.server.drain.begin()
        client = await Client.connect(served.port)
        headers, _ = await client.answer("/fast")
        assert headers["connection"] == "close"
        assert await client.closed_cleanly()


async def test_without_a_drain_connections_stay_kept_alive() -> None:
    async with serving(App()) as served:
        client = await Client.connect(served.port)
        for _ in range(3):
            headers, _ = await client.answer("/fast")
            assert "connection" not in headers


def testunread_bytes_counts_what_the_socket_holds() -> None:
    class Transport:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def get_extra_info(self, name: str) -> socket.socket:
            assert name == "socket"
            return self.sock

    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert unread_bytes(Transport(ours)) == 0  # type: ignore[arg-type]
        theirs.sendall(b"POST /")
        deadline = time.monotonic() + 2
        while unread_bytes(Transport(ours)) == 0 and time.monotonic() < deadline:  # type: ignore[arg-type]
            time.sleep(0.01)
        assert unread_bytes(Transport(ours)) == 6  # type: ignore[arg-type]
