"""Where a request's time went: waiting for its model, on its backend, and in the proxy itself.

`ServerTiming` is a pure ASGI middleware (it never holds a body back, so a stream passes as it
is sent). It starts a `RequestTiming` as a request arrives, leaves it in the ASGI scope for the
chat path to fill in, and adds a `Server-Timing` header as the response's headers go out:

    Server-Timing: queue;dur=0.0, upstream;dur=312.4, proxy;dur=0.9

in milliseconds. `queue` is the wait for the GPU slot and the model's start, `upstream` the
backend's time (until its headers for a stream, its whole body otherwise), `proxy` the rest of
the time until our headers. A wait that never began is left out (only `proxy` for every route
but the chat completion); one still running when the headers go out early (a stream's
`: loading` heartbeat while the model starts) counts up to that moment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RequestTiming", "ServerTiming", "Wait", "request_timing", "timing_headers"]

_SCOPE_KEY = "imageworks.timing"


class Wait:
    """Time a request spends waiting on something else: `with wait:` around each span adds it."""

    __slots__ = ("_since", "_timing", "total_s")

    def __init__(self, timing: RequestTiming) -> None:
        self._timing = timing
        self.total_s: float | None = None  # None: never entered
        self._since: float | None = None

    def __enter__(self) -> None:
        self._since = self._timing.clock()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._since is None:
            return
        now = self._timing.clock()
        self.total_s = (self.total_s or 0.0) + (now - self._since)
        self._since = None
        self._timing.last_wait_end = max(self._timing.last_wait_end, now)

    def so_far(self, now: float) -> float | None:
        """Its time up to `now`, a wait in progress included; None if it never began."""
        if self._since is None:
            return self.total_s
        return (self.total_s or 0.0) + (now - self._since)


class RequestTiming:
    """One request's clock: a few `clock()` calls per request. Only the request's own tasks
    touch it, all on the event loop, so it needs no lock."""

    __slots__ = ("clock", "last_wait_end", "queue", "responded", "started", "upstream")

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.started = clock()
        self.responded: float | None = None  # when the response's headers went out
        self.last_wait_end = self.started
        self.queue = Wait(self)
        self.upstream = Wait(self)

    def header(self, now: float) -> bytes:
        """The `Server-Timing` value at `now`: what is known by then."""
        parts = []
        elsewhere = 0.0
        for name, wait in (("queue", self.queue), ("upstream", self.upstream)):
            seconds = wait.so_far(now)
            if seconds is not None:
                parts.append(f"{name};dur={seconds * 1000:.1f}")
                elsewhere += seconds
        parts.append(f"proxy;dur={max(0.0, now - self.started - elsewhere) * 1000:.1f}")
        return ", ".join(parts).encode("ascii")

    def proxy_s(self) -> float | None:
        """The proxy's own time until its answer began, or None if no answer went out.

        The answer begins at our headers, or when the last wait ended if that came later (a
        stream whose headers a heartbeat sent while it still waited)."""
        if self.responded is None:
            return None
        end = max(self.responded, self.last_wait_end)
        elsewhere = (self.queue.total_s or 0.0) + (self.upstream.total_s or 0.0)
        return max(0.0, end - self.started - elsewhere)


def request_timing(scope: Scope) -> RequestTiming | None:
    """The request's clock, if `ServerTiming` runs in front of the app."""
    timing: RequestTiming | None = scope.get(_SCOPE_KEY)
    return timing


def timing_headers(scope: Scope) -> dict[str, str]:
    """The header for a response made outside the middleware: Starlette answers an unhandled
    exception from a handler that sits outside every middleware of ours."""
    timing = request_timing(scope)
    if timing is None:
        return {}
    return {"server-timing": timing.header(timing.clock()).decode("ascii")}


class ServerTiming:
    """Adds `Server-Timing` to every HTTP response, streams and errors included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        timing = RequestTiming()
        scope[_SCOPE_KEY] = timing

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start":
                now = timing.responded = timing.clock()
                # A new list: the response's own (sse.SSE_HEADERS is shared) stays as it was.
                headers = [*message.get("headers", ()), (b"server-timing", timing.header(now))]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_timed)
