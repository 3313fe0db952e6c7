"""Just enough HTTP/1.1 for the clients here: where a response ends, and a blocking keep-alive
client for sequential requests.

Only the framing is read (status, Content-Length or chunk sizes), never the body, so a client
built on it costs a few microseconds per response, not the tens that a full HTTP library adds:
what it measures is the server.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass


def request_bytes(method: str, host: str, port: int, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def response_end(buffer: bytes | bytearray) -> tuple[int, int] | None:
    """(offset just past the first complete response in `buffer`, its status), or None while
    it is incomplete. Bodies are delimited by Content-Length or chunked encoding."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buffer[:head_end]).lower()
    status = int(head[9:12])
    start = head_end + 4
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        value_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : value_end if value_end >= 0 else len(head)])
        end = start + length
        return (end, status) if len(buffer) >= end else None
    if b"\r\ntransfer-encoding:" in head and b"chunked" in head:
        at = start
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                return None
            size = int(bytes(buffer[at:line_end]).split(b";", 1)[0], 16)
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                return (trailer_end + 4, status) if trailer_end >= 0 else None
            at = line_end + 2 + size + 2
            if len(buffer) < at:
                return None
    return start, status  # no body


@dataclass
class Timed:
    status: int
    started_ns: int
    ended_ns: int

    @property
    def ms(self) -> float:
        return (self.ended_ns - self.started_ns) / 1e6


class KeepAlive:
    """One blocking keep-alive connection (TCP_NODELAY), reconnecting when the server closes."""

    def __init__(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self._address = (host, port)
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self._address, timeout=self._timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer.clear()
        return sock

    def send(self, request: bytes) -> Timed:
        if self._sock is None:
            self._sock = self._connect()
        started = time.monotonic_ns()
        try:
            self._sock.sendall(request)
            while (found := response_end(self._buffer)) is None:
                data = self._sock.recv(262144)
                if not data:
                    raise ConnectionError("the server closed the connection")
                self._buffer += data
        except OSError:
            self.close()
            raise
        ended = time.monotonic_ns()
        del self._buffer[: found[0]]
        return Timed(found[1], started, ended)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
