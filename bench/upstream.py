"""The minimal OpenAI upstream the benchmark measures against: it answers at once.

    python -m bench.upstream --port 8101 [--chunks 200] [--chunk-interval-ms 1]

One asyncio protocol (on uvloop when installed), no framework: it reads a request's head and
body, and answers from bytes made at start-up, so it costs far less per request than anything
measured through it. Keep-alive and pipelining work as HTTP/1.1 says.

- `POST .../chat/completions` answers a fixed completion, or, when the body asks for a stream,
  `--chunks` content chunks `--chunk-interval-ms` apart, a final chunk with `finish_reason` and
  `data: [DONE]`. Each content chunk carries the moment it was written (`time.monotonic_ns()`,
  one clock for every process on the machine) as its text, so a client can tell how long each
  event took to reach it.
- `GET .../models` lists the one model, `GET /health` says ok.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "echo",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
    },
    separators=(",", ":"),
).encode()
_MODELS = json.dumps(
    {"object": "list", "data": [{"id": "echo", "object": "model", "owned_by": "bench"}]},
    separators=(",", ":"),
).encode()
_CHUNK_HEAD = (
    b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"echo","choices":[{"index":0,"delta":{"content":"'
)
_CHUNK_TAIL = b'"},"finish_reason":null}]}'
_LAST_CHUNK = (
    b'{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"echo","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":200,"total_tokens":209}}'
)
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
)


def _whole(status: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    ) + body


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(data: bytes) -> bytes:
    return _chunked(b"data: " + data + b"\n\n")


_ANSWERS = {
    b"GET": {b"/v1/models": _whole(b"200 OK", _MODELS), b"/health": _whole(b"200 OK", b"{}")},
}
_NOT_FOUND = _whole(b"404 Not Found", b'{"error":{"message":"not found"}}')
_COMPLETION_ANSWER = _whole(b"200 OK", _COMPLETION)


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, chunks: int, interval_s: float) -> None:
        self._chunks = chunks
        self._interval_s = interval_s
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._streaming: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._streaming is not None:
            self._streaming.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._streaming is None:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self._buffer[:head_end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self._buffer) < end:
                return
            body = self._buffer[head_end + 4 : end]
            self._buffer = self._buffer[end:]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        assert self._transport is not None
        method, path, _ = head.split(b" ", 2)
        path = path.split(b"?", 1)[0]
        if method == b"POST" and path.endswith(b"/chat/completions"):
            if b'"stream":true' in body.replace(b" ", b""):
                self._streaming = asyncio.ensure_future(self._stream())
            else:
                self._transport.write(_COMPLETION_ANSWER)
            return
        self._transport.write(_ANSWERS.get(method, {}).get(path, _NOT_FOUND))

    async def _stream(self) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(_STREAM_HEAD)
        for _ in range(self._chunks):
            if self._interval_s:
                await asyncio.sleep(self._interval_s)
            stamp = b"%d" % time.monotonic_ns()
            transport.write(_event(_CHUNK_HEAD + stamp + _CHUNK_TAIL))
        transport.write(_event(_LAST_CHUNK) + _event(b"[DONE]") + b"0\r\n\r\n")
        self._streaming = None
        if self._buffer:  # a request pipelined behind the stream
            self.data_received(b"")


async def serve(host: str, port: int, chunks: int, interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(chunks, interval_s), host, port, backlog=1024, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--chunk-interval-ms", type=float, default=1.0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(serve(args.host, args.port, args.chunks, args.chunk_interval_ms / 1000))


if __name__ == "__main__":
    main()
