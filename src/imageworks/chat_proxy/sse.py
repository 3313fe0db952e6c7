"""An ASGI response written by one task, which is cancelled the moment the client goes away.

`TaskResponse(work)` runs `work(reply)` (a whole request, from its first step to its last byte)
in one task and races it against a listener for the client's disconnect, as Starlette's
`StreamingResponse` does: whichever ends first cancels the other. The work is cancelled at most
once, so its `finally` blocks (closing the upstream request, leaving the model lease, recording
the outcome) run to their end undisturbed; the response waits for them even if the server
cancels the response itself.

`Reply` is how the work writes: one whole body, or server-sent events, optionally preceded by
`: comment` heartbeats while the work waits (the first one sends the stream's headers, so a
failure after it is an error event, not a status). Writing to a client that has gone raises
`ClientGone`. `shielded(cleanup)` runs a cleanup step to its end even if the work is cancelled
while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from imageworks.chat_proxy.protocol import SSE_DONE, ProxyError, json_bytes, sse_error

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends must not buffer the stream
]


class ClientGone(Exception):
    """The client's connection broke while the proxy was writing to it."""


class Reply:
    """Writes one HTTP response. Not for concurrent use, except that a heartbeat started by
    `keep_alive` stops before anything else is written."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False  # the status line and headers are out
        self.complete = False  # and the last of the body
        self._heartbeat: asyncio.Task[None] | None = None

    def keep_alive(self, interval_s: float, comment: Callable[[], str]) -> None:
        """Until something else is written, send `: <comment()> <N>s` every `interval_s`; the
        first one opens the event stream."""
        self._heartbeat = asyncio.ensure_future(self._beat(interval_s, comment))

    async def open_stream(self) -> None:
        """Send the event stream's headers now (if no heartbeat did already), and stop beating."""
        await self.quiet()
        await self._open_stream()

    async def event(self, data: bytes) -> None:
        """One SSE event (or comment), opening the stream if this is the first."""
        await self.open_stream()
        await self._body(data, more=True)

    async def done(self) -> None:
        """`data: [DONE]` and the end of the stream."""
        await self.event(SSE_DONE)
        await self._body(b"", more=False)

    async def end(self) -> None:
        """The end of an event stream that has no `[DONE]` (the Responses API's)."""
        await self.open_stream()
        await self._body(b"", more=False)

    async def whole(
        self,
        status: int,
        content: bytes,
        *,
        media_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        await self.quiet()
        raw = [(b"content-type", media_type.encode()), (b"content-length", b"%d" % len(content))]
        raw += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
        await self._start(status, raw)
        await self._body(content, more=False)

    async def fail(self, error: ProxyError) -> None:
        """The error as the answer: its status and JSON body, or, once the stream has begun,
        an error event and `[DONE]`. Nothing once the response is complete."""
        await self.quiet()
        if self.complete:
            return
        if self.started:
            await self.event(sse_error(error))
            await self.done()
        else:
            body = json_bytes(error.body())
            await self.whole(error.status, body, headers=error.headers())

    async def quiet(self) -> None:
        """Stop the heartbeat, if one runs."""
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is None:
            return
        heartbeat.cancel()
        await asyncio.wait({heartbeat})  # unlike `await heartbeat`, keeps our own cancellation
        if not heartbeat.cancelled():
            heartbeat.result()  # a heartbeat that broke is the work's error

    async def _beat(self, interval_s: float, comment: Callable[[], str]) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with contextlib.suppress(ClientGone):  # the disconnect listener ends the request
            while True:
                await asyncio.sleep(interval_s)
                await self._open_stream()
                line = f": {comment()} {loop.time() - began:.0f}s\n\n"
                await self._body(line.encode(), more=True)

    async def _open_stream(self) -> None:
        if not self.started:
            await self._start(200, SSE_HEADERS)

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self._write({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True

    async def _body(self, data: bytes, *, more: bool) -> None:
        await self._write({"type": "http.response.body", "body": data, "more_body": more})
        self.complete = not more

    async def _write(self, message: Message) -> None:
        try:
            await self._send(message)
        except OSError as exc:  # e.g. uvicorn's ClientDisconnected
            raise ClientGone(str(exc)) from exc


class TaskResponse(Response):
    # A Response subclass so frameworks hand it to the server as it is; __call__ is all ours.
    def __init__(self, work: Callable[[Reply], Awaitable[None]]) -> None:
        self.status_code = 200  # what the work writes decides
        self.background = None
        self.body = b""
        self._work = work

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._run(Reply(send)))
        listen = asyncio.ensure_future(_wait_for_disconnect(receive))
        listen.add_done_callback(_retrieved)  # a receive() that failed only ends the race
        try:
            await _first_done(work, listen)
        finally:
            # The listener holds nothing and needs no waiting for: once cancelled it ends on
            # the loop's next turn (a task fewer to wait for on every request).
            listen.cancel()
            work.cancel()  # the only cancellation the work ever gets (a no-op once it is done)
            await _settled(work)
        if not work.cancelled() and (error := work.exception()) is not None:
            raise error  # a bug in the work itself: the server logs it

    async def _run(self, reply: Reply) -> None:
        try:
            await self._work(reply)
        except ClientGone:
            pass  # the listener sees the disconnect too; nothing is left to write
        finally:
            await reply.quiet()


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _retrieved(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


async def _first_done(*tasks: asyncio.Future[None]) -> None:
    """Wait until one of `tasks` is done (`asyncio.wait(FIRST_COMPLETED)` without its sets)."""
    woken = asyncio.get_running_loop().create_future()

    def wake(_: asyncio.Future[None]) -> None:
        if not woken.done():
            woken.set_result(None)

    for task in tasks:
        task.add_done_callback(wake)
    try:
        await woken
    finally:
        for task in tasks:
            task.remove_done_callback(wake)


async def shielded(cleanup: Awaitable[None]) -> None:
    """Await `cleanup` to its end even if the caller is cancelled meanwhile (then re-raise)."""
    task = asyncio.ensure_future(cleanup)
    await _settled(task)
    task.result()


async def _settled(*tasks: asyncio.Future[None]) -> None:
    """Wait until every task is done, even if we are cancelled meanwhile (then re-raise)."""
    if all(task.done() for task in tasks):
        return  # the usual case: no turn of the loop to wait for
    cancelled = False
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
