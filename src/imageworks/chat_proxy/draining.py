"""The connections' part of a graceful shutdown (a restart's drain, or a stop): no request a
client has sent is lost to a closed connection, and every answer from then on says so first.

uvicorn's own (`HttpToolsProtocol.shutdown`, uvicorn 0.54) loses requests on kept-alive
connections in three ways:

- a connection between two requests is closed at once. The client may already have sent its
  next request: bytes in the socket's buffer, or half a head parsed. Closing a socket with unread
  bytes sends a reset, so the client reads `ECONNRESET` instead of an answer;
- a response whose headers are already out (a stream) ends with the connection closed, though
  its headers promised keep-alive: the client's next request races that close, and may be reset;
- a connection accepted just before the listener closed is made (`connection_made`) a turn of
  the loop later, after the server told every connection to shut down: it stays kept-alive, so
  the drain cannot end while its client keeps sending, and when the graceful timeout finally
  expires the lifespan stops the model under its requests.

Here, once the drain has begun:

- every answer whose headers are still to be sent carries `Connection: close`, and the
  connection closes after it (the client asked nothing more: a clean close);
- a connection between requests stays open until it has been quiet (no answer sent, no byte
  received) for `QUIET_S`; a request arriving meanwhile is served (the model is still up)
  with `Connection: close`. Just before closing, the socket is asked whether bytes are waiting:
  if so a request is arriving, and the connection waits for it instead. So only a client that
  was quiet for QUIET_S and sends in the very instant of the close can lose its request: the
  same race as the keep-alive timeout, which ends quiet connections at any time anyway;
- a connection made after the drain began drains from its first byte.

A connection therefore serves at most one more request once the drain begins, and is closed
only when quiet: uvicorn waits for the connections to close, then for the tasks, and only then
runs the lifespan's shutdown (which stops the model), so every request accepted before it has
its answer.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# How long a connection between requests stays open in a drain for the client's next request.
# A client sending request after request sends its next within milliseconds of an answer; a
# second covers a busy machine, and is well under uvicorn's keep-alive timeout (5 s), which
# closes a quiet connection anyway.
QUIET_S = 1.0


class Drain:
    """Whether the server's graceful shutdown has begun, for all its connections; `protocol` is
    the class to give `uvicorn.Config(http=...)`."""

    def __init__(self, quiet_s: float = QUIET_S) -> None:
        self.begun = False
        self.quiet_s = quiet_s

        class BoundProtocol(DrainingHttpProtocol):
            pass

        BoundProtocol.drain = self
        self.protocol: type[DrainingHttpProtocol] = BoundProtocol

    def begin(self) -> None:
        """Called when the server begins to shut down, before it tells the connections."""
        self.begun = True


class DrainingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the drain described above."""

    drain: ClassVar[Drain]
    # When the connection last went quiet (made, or an answer sent); None: a request is arriving.
    _quiet_since: float | None = None
    _head_pending = False  # a request's first bytes have arrived, its head is not complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._quiet_since = self.loop.time()
        if self.drain.begun:  # made after the server told the connections
            self.shutdown()

    def data_received(self, data: bytes) -> None:
        self._quiet_since = None
        super().data_received(data)  # cancels the keep-alive timer
        if self.drain.begun and self._between_requests() and not self._head_pending:
            self._quiet_since = self.loop.time()  # bytes that began no request (a stray CRLF)
            self._close_when_quiet()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_pending = True

    def on_headers_complete(self) -> None:
        self._head_pending = False
        super().on_headers_complete()  # makes the request's cycle; its task runs later
        if self.drain.begun and self.cycle is not None:
            self.cycle.keep_alive = False  # its answer says `Connection: close`

    def on_response_complete(self) -> None:
        super().on_response_complete()  # the keep-alive timer, unless the connection closes
        self._quiet_since = self.loop.time()
        if self.drain.begun and not self.transport.is_closing():
            self._close_when_quiet()

    def shutdown(self) -> None:
        """Called by the server as its graceful shutdown begins (or by `connection_made`)."""
        if self._between_requests():
            self._close_when_quiet()
        elif not self.cycle.response_started:
            self.cycle.keep_alive = False  # its headers will say `Connection: close`
        # Else the headers are out and promised keep-alive: the client may send its next
        # request the moment this answer ends, so `on_response_complete` waits for quiet.

    def timeout_keep_alive_handler(self) -> None:
        if not self.drain.begun or self.transport.is_closing():
            super().timeout_keep_alive_handler()
        elif not self._between_requests():
            pass  # a request came: its answer says `Connection: close`, then the connection closes
        elif self._head_pending or unread_bytes(self.transport):
            self._quiet_since = None  # a request is arriving: look again later
            self._close_when_quiet()
        else:
            self.transport.close()  # nothing unread: a FIN, not a reset

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _close_when_quiet(self) -> None:
        """(Re)arm the keep-alive timer to fire once the connection has been quiet QUIET_S; it
        shares uvicorn's handle, so a byte received cancels it as uvicorn's own timer is."""
        self._unset_keepalive_if_required()
        now = self.loop.time()
        since = now if self._quiet_since is None else self._quiet_since
        delay = max(0.0, since + self.drain.quiet_s - now)
        self.timeout_keep_alive_task = self.loop.call_later(delay, self.timeout_keep_alive_handler)


def unread_bytes(transport: asyncio.Transport) -> int:
    """Bytes received on the connection's socket that nobody has read yet."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return 0
    try:
        answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    count: int = struct.unpack("i", answer)[0]
    return count
