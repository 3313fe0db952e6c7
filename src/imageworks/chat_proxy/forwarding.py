"""Talking to the backend: one pooled aiohttp session, SSE events passed through as received.

aiohttp's client, not httpx's: measured against the minimal upstream at 32 connections it
costs about 130 µs of CPU per request where a tuned httpx pool costs 1.2-1.6 ms (httpcore
scans every pooled connection, and asks each socket whether it is readable, on every request).

Every aiohttp error is translated into a `ProxyError` here and nowhere else. One trade-off
comes with aiohttp: when a backend's connection breaks mid-stream, what it read together with
the break (the same socket read) is dropped, not handed over first; the client still gets the
events before that, whole, then the error event and `[DONE]`. Streams are read as
raw bytes and cut only at event boundaries, so an event reaches the client the moment it is
complete, byte for byte as the backend sent it. A chat call's `wait` times the backend alone
(until its headers for a stream, its whole body otherwise), for Server-Timing and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from imageworks.backends.base import Target
from imageworks.chat_proxy.normalize.ollama import (
    OllamaStreamTranslator,
    from_ollama_chat,
    to_ollama_chat,
)
from imageworks.chat_proxy.protocol import (
    BackendTimeout,
    BackendUnavailable,
    BadGateway,
    ProxyError,
    json_bytes,
    parse_json,
    sse_event,
    upstream_error,
)
from imageworks.chat_proxy.requests import ChatCompletionRequest, request_json
from imageworks.chat_proxy.timing import Wait

# identity: the proxy passes bytes through, and has no wish to inflate them first.
_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}
# Calls beside the chat request (tokenizer endpoints) are quick or not worth waiting for.
_SIDE_CALL_TIMEOUT_S = 10.0
# Pooled connections to a backend kept open between requests; more wait for one to come back.
_MAX_CONNECTIONS = 256


def new_session() -> aiohttp.ClientSession:
    """The process-wide session (made on the running loop). Timeouts are set per request: a
    stream's read timeout is its idle timeout, a plain call's is the backend timeout."""
    connector = aiohttp.TCPConnector(limit=_MAX_CONNECTIONS, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        headers=_HEADERS,
        auto_decompress=False,
        trust_env=False,  # a proxy variable must not reroute loopback model traffic
        timeout=aiohttp.ClientTimeout(total=None),  # ours, per request
        skip_auto_headers=("User-Agent",),
    )


def translate(exc: aiohttp.ClientError, target: Target) -> ProxyError:
    """The one place where transport errors become client-facing errors."""
    where = f"backend {target.label} at {target.base_url}"
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return BackendUnavailable(f"Cannot reach {where}: {exc}", code="backend_unreachable")
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return BackendTimeout(f"No answer from {where} in time.", code="backend_timeout")
    if isinstance(
        exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientOSError
    ):
        return BadGateway(
            f"The {where} closed the connection unexpectedly.", code="upstream_disconnected"
        )
    return BadGateway(f"Request to {where} failed: {exc}", code="upstream_error")


@dataclass(frozen=True, slots=True)
class Completion:
    """A non-streaming answer: the backend's bytes, and its parsed JSON for bookkeeping."""

    status: int
    content: bytes
    parsed: dict[str, Any]


class Forwarder:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        backend_timeout_s: float,
        stream_idle_timeout_s: float,
    ) -> None:
        self._session = session
        self._backend_timeout_s = backend_timeout_s
        self._idle_timeout_s = stream_idle_timeout_s
        # Made once: every request of a kind has the same limits.
        self._stream_timeout = _timeout(backend_timeout_s, read_s=stream_idle_timeout_s)
        self._call_timeout = _timeout(backend_timeout_s, read_s=backend_timeout_s)

    async def complete(
        self, target: Target, body: ChatCompletionRequest, *, wait: Wait | None = None
    ) -> Completion:
        """POST and wait for the whole answer, within the backend timeout."""
        return await self.complete_at(
            target, "chat/completions", request_json(body, model=target.model), wait=wait
        )

    async def complete_at(
        self, target: Target, path: str, content: bytes, *, wait: Wait | None = None
    ) -> Completion:
        """POST `content` to `path` below the target's OpenAI base (`completions`,
        `embeddings` ...) and wait for the whole answer, within the backend timeout."""
        return await self._complete(target, f"{target.base_url}/{path}", content, wait=wait)

    async def backend_json(
        self, target: Target, path: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        """POST `payload` to `path` at the backend's root, beside `/v1` (where llama-server and
        vLLM have their tokenizer endpoints), and return its JSON object; ProxyErrors."""
        timeout = min(self._backend_timeout_s, _SIDE_CALL_TIMEOUT_S)
        url = target.base_url.removesuffix("/v1") + path
        answer = await self._complete(target, url, json_bytes(payload), timeout)
        return answer.parsed

    async def _complete(
        self,
        target: Target,
        url: str,
        content: bytes,
        timeout_s: float | None = None,
        *,
        wait: Wait | None = None,
    ) -> Completion:
        own = target.timeouts
        limit = own.request_s or self._backend_timeout_s
        timeout_s = limit if timeout_s is None else min(timeout_s, limit)
        call_timeout = self._call_timeout
        if own.request_s or own.connect_s:
            call_timeout = _timeout(own.connect_s or limit, read_s=limit)
        try:
            with wait or contextlib.nullcontext():
                async with asyncio.timeout(timeout_s):
                    response = await self._session.post(
                        url, data=content, timeout=call_timeout, headers=_headers(target)
                    )
                    async with response:
                        answer = await response.read()
        except aiohttp.ClientError as exc:
            raise translate(exc, target) from exc
        except TimeoutError:
            raise BackendTimeout(
                f"Backend {target.label} did not answer within {timeout_s:g}s.",
                code="backend_timeout",
            ) from None
        if response.status >= 400:
            raise _refused_key(response.status, target) or upstream_error(
                response.status, answer, target.label
            )
        try:
            parsed = parse_json(answer)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if not isinstance(parsed, dict):
            raise BadGateway(
                f"Backend {target.label} answered with a body that is not a JSON object.",
                code="bad_upstream_response",
            )
        return Completion(response.status, answer, parsed)

    async def open_stream(
        self, target: Target, body: ChatCompletionRequest, *, wait: Wait | None = None
    ) -> UpstreamStream:
        """Send a streaming request and wait for the backend's headers (errors come before
        the client sees anything, so they keep their HTTP status)."""
        content = request_json(body, model=target.model)
        return await self.open_stream_at(target, "chat/completions", content, wait=wait)

    async def open_stream_at(
        self, target: Target, path: str, content: bytes, *, wait: Wait | None = None
    ) -> UpstreamStream:
        """`open_stream` for any endpoint's `path` below the target's OpenAI base."""
        url = f"{target.base_url}/{path}"
        response = await self._send_stream(target, url, content, wait)
        return UpstreamStream(response, target, self._idle_timeout(target))

    async def _send_stream(
        self, target: Target, url: str, content: bytes, wait: Wait | None
    ) -> aiohttp.ClientResponse:
        own = target.timeouts
        stream_timeout = self._stream_timeout
        if own.request_s or own.stream_idle_s or own.connect_s:
            stream_timeout = _timeout(
                own.connect_s or own.request_s or self._backend_timeout_s,
                read_s=self._idle_timeout(target),
            )
        with wait or contextlib.nullcontext():  # an error's body is the backend's time too
            try:
                response = await self._session.post(
                    url, data=content, timeout=stream_timeout, headers=_headers(target)
                )
            except aiohttp.ClientError as exc:
                raise translate(exc, target) from exc
            if response.status >= 400:
                try:
                    answer = await response.read()
                except aiohttp.ClientError as exc:
                    raise translate(exc, target) from exc
                finally:
                    response.release()
                raise _refused_key(response.status, target) or upstream_error(
                    response.status, answer, target.label
                )
        return response

    def _idle_timeout(self, target: Target) -> float:
        return target.timeouts.stream_idle_s or self._idle_timeout_s

    # -- Ollama's native /api/chat, for what its /v1 cannot do (images, tool arguments, num_ctx)

    async def complete_ollama(
        self,
        target: Target,
        body: ChatCompletionRequest,
        num_ctx: int | None,
        *,
        wait: Wait | None = None,
    ) -> Completion:
        payload = {**to_ollama_chat(body, model=target.model, num_ctx=num_ctx), "stream": False}
        native = await self._complete(
            target, _ollama_chat_url(target), json_bytes(payload), wait=wait
        )
        answer = from_ollama_chat(
            native.parsed, request_model=target.model, completion_id=_completion_id()
        )
        return Completion(native.status, json_bytes(answer), answer)

    async def open_ollama_stream(
        self,
        target: Target,
        body: ChatCompletionRequest,
        num_ctx: int | None,
        *,
        wait: Wait | None = None,
    ) -> UpstreamStream:
        payload = {**to_ollama_chat(body, model=target.model, num_ctx=num_ctx), "stream": True}
        url = _ollama_chat_url(target)
        response = await self._send_stream(target, url, json_bytes(payload), wait)
        options = body.stream_options
        wants_usage = options is not None and bool(options.include_usage)
        translator = OllamaStreamTranslator(target.model, _completion_id())
        idle_s = self._idle_timeout(target)
        return OllamaUpstreamStream(response, target, idle_s, translator, wants_usage)


class UpstreamStream:
    """An open streaming response. Iterate `events()`; always `aclose()` (a finally does)."""

    def __init__(
        self, response: aiohttp.ClientResponse, target: Target, idle_timeout_s: float
    ) -> None:
        self._response = response
        self.target = target
        self._idle_timeout_s = idle_timeout_s

    async def events(self) -> AsyncIterator[bytes]:
        """Each complete SSE event, separator included; transport errors become ProxyErrors."""
        try:
            async for event in self._events():
                yield event
        except (aiohttp.ServerTimeoutError, TimeoutError):
            raise BackendTimeout(
                f"Backend {self.target.label} sent nothing for {self._idle_timeout_s:g}s; "
                "the stream was ended.",
                code="stream_idle_timeout",
            ) from None
        except aiohttp.ClientError as exc:
            raise translate(exc, self.target) from exc

    async def _events(self) -> AsyncIterator[bytes]:
        """The backend's SSE events, cut at event boundaries, byte for byte as sent."""
        buffer = b""
        async for chunk in self._response.content.iter_any():
            buffer = buffer + chunk if buffer else chunk
            while (cut := _event_end(buffer)) >= 0:
                yield buffer[:cut]
                buffer = buffer[cut:]
        if buffer.strip():  # a last event without its blank line still counts
            yield buffer + b"\n\n"

    async def _lines(self) -> AsyncIterator[bytes]:
        """The body's lines (no line ending), however the chunks cut them."""
        buffer = b""
        async for chunk in self._response.content.iter_any():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r")
        if buffer:
            yield buffer

    async def aclose(self) -> None:
        """Done with the stream: a connection read to its end goes back to the pool; one left
        half-way is closed, which is how the backend learns to stop generating."""
        if self._response.content.at_eof():
            self._response.release()
        else:
            self._response.close()


class OllamaUpstreamStream(UpstreamStream):
    """Ollama's NDJSON stream, re-spoken as OpenAI SSE events."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        target: Target,
        idle_timeout_s: float,
        translator: OllamaStreamTranslator,
        wants_usage: bool,
    ) -> None:
        super().__init__(response, target, idle_timeout_s)
        self._translator = translator
        self._wants_usage = wants_usage

    async def _events(self) -> AsyncIterator[bytes]:
        async for line in self._lines():
            if not line.strip():
                continue
            try:
                parsed = parse_json(line)
            except (ValueError, UnicodeDecodeError):
                raise BadGateway(
                    f"Backend {self.target.label} sent a line that is not JSON.",
                    code="bad_upstream_response",
                ) from None
            for chunk in self._translator.translate(parsed):
                # OpenAI sends a usage chunk only to clients that asked for one.
                if chunk.get("choices") == [] and not self._wants_usage:
                    continue
                yield sse_event(chunk)


def _timeout(connect_s: float, *, read_s: float) -> aiohttp.ClientTimeout:
    """Connecting may take `connect_s`, and each read waits up to `read_s` for a byte (for a
    stream: its idle timeout); no total, the caller bounds the whole call where it has one."""
    return aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)


def _headers(target: Target) -> dict[str, str] | None:
    """The target's own headers (a remote's `Authorization`), over the session's."""
    return dict(target.headers) if target.headers else None


def _refused_key(status: int, target: Target) -> ProxyError | None:
    """A remote refusing the key we sent for it. A 502, not its 401/403: the client's own key
    was fine (a 401 would tell it otherwise); the proxy's key for that remote was not. The
    remote's body is not quoted, as a server may echo the key it refused."""
    if status not in (401, 403) or target.key_env is None:
        return None
    return BadGateway(
        f"The remote {target.label} at {target.base_url} refused the key in the proxy's "
        f"environment variable {target.key_env} (HTTP {status}).",
        code="remote_key_refused",
    )


def _ollama_chat_url(target: Target) -> str:
    return target.base_url.removesuffix("/v1") + "/api/chat"


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _event_end(buffer: bytes) -> int:
    """Index just past the first event separator in `buffer`, or -1. Backends end events with
    a blank line, `\\n\\n`, a few with `\\r\\n\\r\\n`: the first in the buffer counts."""
    lf = buffer.find(b"\n\n")
    if b"\r" not in buffer:
        return -1 if lf < 0 else lf + 2
    crlf = buffer.find(b"\r\n\r\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 4
    return -1 if lf < 0 else lf + 2
