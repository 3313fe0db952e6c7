"""Talking to the backend: one pooled HTTP client, SSE events passed through as received.

Every httpx error is translated into a `ProxyError` here and nowhere else. Streams are read as
raw bytes and cut only at event boundaries, so an event reaches the client the moment it is
complete, byte for byte as the backend sent it. A chat call's `wait` times the backend alone
(until its headers for a stream, its whole body otherwise), for Server-Timing and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

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
    sse_event,
    upstream_error,
)
from imageworks.chat_proxy.requests import ChatCompletionRequest, request_json
from imageworks.chat_proxy.timing import Wait

_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n")
# Calls beside the chat request (tokenizer endpoints) are quick or not worth waiting for.
_SIDE_CALL_TIMEOUT_S = 10.0


def new_client() -> httpx.AsyncClient:
    """The process-wide client. Timeouts are set per request: a stream's read timeout is its
    idle timeout, a plain call's is the backend timeout."""
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        headers=_HEADERS,
        trust_env=False,  # a proxy variable must not reroute loopback model traffic
    )


def translate(exc: httpx.HTTPError, target: Target) -> ProxyError:
    """The one place where transport errors become client-facing errors."""
    where = f"backend {target.label} at {target.base_url}"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return BackendUnavailable(f"Cannot reach {where}: {exc}", code="backend_unreachable")
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"No answer from {where} in time.", code="backend_timeout")
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
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
        self, client: httpx.AsyncClient, backend_timeout_s: float, stream_idle_timeout_s: float
    ) -> None:
        self._client = client
        self._backend_timeout_s = backend_timeout_s
        self._idle_timeout_s = stream_idle_timeout_s

    def _request(self, url: str, content: bytes, read_timeout: float) -> httpx.Request:
        return self._client.build_request(
            "POST",
            url,
            content=content,
            timeout=httpx.Timeout(self._backend_timeout_s, read=read_timeout),
        )

    def _openai_request(
        self, target: Target, body: ChatCompletionRequest, read_timeout: float
    ) -> httpx.Request:
        content = request_json(body, model=target.model)
        return self._request(f"{target.base_url}/chat/completions", content, read_timeout)

    async def complete(
        self, target: Target, body: ChatCompletionRequest, *, wait: Wait | None = None
    ) -> Completion:
        """POST and wait for the whole answer, within the backend timeout."""
        request = self._openai_request(target, body, self._backend_timeout_s)
        return await self._complete(target, request, wait=wait)

    async def backend_json(
        self, target: Target, path: str, payload: dict[str, Any]
    ) -> dict[str, Any]:
        """POST `payload` to `path` at the backend's root, beside `/v1` (where llama-server and
        vLLM have their tokenizer endpoints), and return its JSON object; ProxyErrors."""
        timeout = min(self._backend_timeout_s, _SIDE_CALL_TIMEOUT_S)
        url = target.base_url.removesuffix("/v1") + path
        request = self._request(url, json_bytes(payload), timeout)
        answer = await self._complete(target, request, timeout)
        return answer.parsed

    async def _complete(
        self,
        target: Target,
        request: httpx.Request,
        timeout_s: float | None = None,
        *,
        wait: Wait | None = None,
    ) -> Completion:
        timeout_s = self._backend_timeout_s if timeout_s is None else timeout_s
        try:
            with wait or contextlib.nullcontext():
                async with asyncio.timeout(timeout_s):
                    response = await self._client.send(request)  # the whole body, read
        except TimeoutError:
            raise BackendTimeout(
                f"Backend {target.label} did not answer within {timeout_s:g}s.",
                code="backend_timeout",
            ) from None
        except httpx.HTTPError as exc:
            raise translate(exc, target) from exc
        if response.status_code >= 400:
            raise upstream_error(response.status_code, response.content, target.label)
        try:
            parsed = json.loads(response.content)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if not isinstance(parsed, dict):
            raise BadGateway(
                f"Backend {target.label} answered with a body that is not a JSON object.",
                code="bad_upstream_response",
            )
        return Completion(response.status_code, response.content, parsed)

    async def open_stream(
        self, target: Target, body: ChatCompletionRequest, *, wait: Wait | None = None
    ) -> UpstreamStream:
        """Send a streaming request and wait for the backend's headers (errors come before
        the client sees anything, so they keep their HTTP status)."""
        request = self._openai_request(target, body, self._idle_timeout_s)
        response = await self._send_stream(target, request, wait)
        return UpstreamStream(response, target, self._idle_timeout_s)

    async def _send_stream(
        self, target: Target, request: httpx.Request, wait: Wait | None
    ) -> httpx.Response:
        with wait or contextlib.nullcontext():  # an error's body is the backend's time too
            try:
                response = await self._client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise translate(exc, target) from exc
            if response.status_code >= 400:
                try:
                    content = await response.aread()
                except httpx.HTTPError as exc:
                    raise translate(exc, target) from exc
                finally:
                    await response.aclose()
                raise upstream_error(response.status_code, content, target.label)
        return response

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
        content = json_bytes(payload)
        request = self._request(_ollama_chat_url(target), content, self._backend_timeout_s)
        native = await self._complete(target, request, wait=wait)
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
        content = json_bytes(payload)
        request = self._request(_ollama_chat_url(target), content, self._idle_timeout_s)
        response = await self._send_stream(target, request, wait)
        options = body.stream_options
        wants_usage = options is not None and bool(options.include_usage)
        translator = OllamaStreamTranslator(target.model, _completion_id())
        return OllamaUpstreamStream(response, target, self._idle_timeout_s, translator, wants_usage)


class UpstreamStream:
    """An open streaming response. Iterate `events()`; always `aclose()` (a finally does)."""

    def __init__(self, response: httpx.Response, target: Target, idle_timeout_s: float) -> None:
        self._response = response
        self.target = target
        self._idle_timeout_s = idle_timeout_s

    async def events(self) -> AsyncIterator[bytes]:
        """Each complete SSE event, separator included; transport errors become ProxyErrors."""
        try:
            async for event in self._events():
                yield event
        except httpx.ReadTimeout:
            raise BackendTimeout(
                f"Backend {self.target.label} sent nothing for {self._idle_timeout_s:g}s; "
                "the stream was ended.",
                code="stream_idle_timeout",
            ) from None
        except httpx.HTTPError as exc:
            raise translate(exc, self.target) from exc

    async def _events(self) -> AsyncIterator[bytes]:
        """The backend's SSE events, cut at event boundaries, byte for byte as sent."""
        buffer = b""
        async for chunk in self._response.aiter_raw():
            buffer += chunk
            while (cut := _event_end(buffer)) >= 0:
                yield buffer[:cut]
                buffer = buffer[cut:]
        if buffer.strip():  # a last event without its blank line still counts
            yield buffer + b"\n\n"

    async def aclose(self) -> None:
        await self._response.aclose()


class OllamaUpstreamStream(UpstreamStream):
    """Ollama's NDJSON stream, re-spoken as OpenAI SSE events."""

    def __init__(
        self,
        response: httpx.Response,
        target: Target,
        idle_timeout_s: float,
        translator: OllamaStreamTranslator,
        wants_usage: bool,
    ) -> None:
        super().__init__(response, target, idle_timeout_s)
        self._translator = translator
        self._wants_usage = wants_usage

    async def _events(self) -> AsyncIterator[bytes]:
        async for line in self._response.aiter_lines():
            if not line.strip():
                continue
            try:
                parsed = json.loads(line)
            except ValueError:
                raise BadGateway(
                    f"Backend {self.target.label} sent a line that is not JSON.",
                    code="bad_upstream_response",
                ) from None
            for chunk in self._translator.translate(parsed):
                # OpenAI sends a usage chunk only to clients that asked for one.
                if chunk.get("choices") == [] and not self._wants_usage:
                    continue
                yield sse_event(chunk)


def _ollama_chat_url(target: Target) -> str:
    return target.base_url.removesuffix("/v1") + "/api/chat"


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _event_end(buffer: bytes) -> int:
    """Index just past the first event separator in `buffer`, or -1."""
    ends = [(index, len(sep)) for sep in _EVENT_ENDS if (index := buffer.find(sep)) >= 0]
    if not ends:
        return -1
    index, length = min(ends)
    return index + length
