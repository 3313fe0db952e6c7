"""One chat completion, from request bytes to response: resolve the model, lease its backend,
forward, and record the outcome (success, error or cancellation) exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from starlette.responses import JSONResponse, Response

from imageworks.backends.base import BackendNotReady, Target
from imageworks.backends.router import BackendRouter
from imageworks.backends.templates import TemplateCheck, check_chat_template
from imageworks.chat_proxy.catalog import Catalog
from imageworks.chat_proxy.exchange import CLIENT_CLOSED, Exchange, usage_of
from imageworks.chat_proxy.forwarding import Forwarder, UpstreamStream
from imageworks.chat_proxy.normalize.ollama_path import needs_native_ollama, ollama_num_ctx
from imageworks.chat_proxy.normalize.reasoning import split_think_completion
from imageworks.chat_proxy.normalize.request import RequestRules, prepare_request
from imageworks.chat_proxy.normalize.stream import EventNormalizer
from imageworks.chat_proxy.normalize.tools import normalize_completion
from imageworks.chat_proxy.normalize.vision import has_images
from imageworks.chat_proxy.observe import Metrics, Outcome, RequestLog
from imageworks.chat_proxy.protocol import (
    SSE_DONE,
    BackendUnavailable,
    InvalidRequest,
    ProxyError,
    json_bytes,
    parse_chat_request,
    sse_error,
)
from imageworks.chat_proxy.sse import EventStreamResponse
from imageworks.registry.errors import RegistryError
from imageworks.registry.naming import display_name
from imageworks.registry.schema import RegistryEntry

_DONE_EVENTS = (b"data: [DONE]", b"data:[DONE]")

# Backends whose servers render the chat template themselves from the weights (Ollama embeds
# it in its model files; external servers are someone else's business).
TEMPLATED_BACKENDS = frozenset({"vllm", "llamacpp"})


@dataclass(frozen=True, slots=True)
class ChatRules:
    """Settings that decide how requests and answers are shaped."""

    request: RequestRules
    require_template: bool
    normalize_tools: bool
    split_think_tags: bool
    log_prompts: bool
    stream_heartbeat_s: float = 5.0


class ChatService:
    def __init__(
        self,
        catalog: Catalog,
        router: BackendRouter,
        forwarder: Forwarder,
        request_log: RequestLog,
        metrics: Metrics,
        rules: ChatRules,
    ) -> None:
        self._catalog = catalog
        self._router = router
        self._forwarder = forwarder
        self._log = request_log
        self._metrics = metrics
        self._rules = rules
        self._log_prompts = rules.log_prompts
        # entry -> template check, per registry snapshot (entries are replaced on reload)
        self._templates: dict[int, tuple[RegistryEntry, TemplateCheck]] = {}

    async def handle(self, raw_body: bytes, client_gone: Callable[[], Awaitable[None]]) -> Response:
        exchange = Exchange()
        try:
            body = parse_chat_request(raw_body)
            exchange.model_requested = body["model"]
            exchange.stream = bool(body.get("stream"))
            exchange.prompt = body.get("messages")
            exchange.entry, registry_dir = await self._resolve(body["model"])
            self._metrics.request_started(exchange.entry.name)
            body = await self._prepare(body, exchange.entry, registry_dir)
            opening = asyncio.ensure_future(self._open(exchange.entry, body, exchange.stream))
            # A stream whose model is still loading after a heartbeat interval gets its headers
            # now and `: loading` comments until it is ready, so clients do not time out.
            patience = self._rules.stream_heartbeat_s if exchange.stream else None
            if not await _opened_in_time(opening, patience, client_gone):
                return EventStreamResponse(
                    self._relay_when_loaded(exchange, opening),
                    on_close=lambda: self._close_unloaded(exchange, opening),
                )
            opened = opening.result()
        except ProxyError as error:
            self._finish(exchange, error.status, "error", error.message)
            return JSONResponse(error.body(), status_code=error.status)
        except _ClientLeft:
            self._finish(exchange, CLIENT_CLOSED, "cancelled", "client disconnected")
            return Response(status_code=CLIENT_CLOSED)

        if isinstance(opened, _OpenStream):
            return EventStreamResponse(
                self._relay(exchange, opened),
                on_close=lambda: self._close_unstarted(exchange, opened),
            )
        content, parsed = self._normalize_completion(opened.content, opened.parsed)
        exchange.usage = usage_of(parsed)
        if self._log_prompts:
            exchange.response = parsed.get("choices")
        self._finish(exchange, opened.status, "ok", None)
        return Response(content, status_code=opened.status, media_type="application/json")

    async def activate(self, model: str) -> None:
        """Make `model`'s backend ready without a request (the admin endpoint); ProxyErrors."""
        entry, _ = await self._resolve(model)
        try:
            async with self._router.backend_for(entry).lease(entry):
                pass
        except BackendNotReady as exc:
            raise _not_ready(exc) from exc

    async def _resolve(self, model: str) -> tuple[RegistryEntry, Path]:
        try:
            view = await self._catalog.view()
        except RegistryError as exc:
            raise BackendUnavailable(f"The model registry cannot be read: {exc}") from exc
        return self._catalog.resolve(view, model), view.snapshot.directory

    async def _prepare(
        self, body: dict[str, Any], entry: RegistryEntry, registry_dir: Path
    ) -> dict[str, Any]:
        """Check and shape the request for the entry (400s come from here)."""
        shown = display_name(entry)
        if self._rules.require_template and entry.backend in TEMPLATED_BACKENDS:
            check = await self._template_check(entry, registry_dir)
            if not check.ok:
                raise InvalidRequest(
                    f"Model '{shown}' has no chat template: {check.reason}. Set "
                    f"chat_template.path in registry entry {entry.name!r} (or run the proxy "
                    "with CHAT_PROXY_REQUIRE_TEMPLATE=0).",
                    param="model",
                    code="chat_template_missing",
                )
        if has_images(body["messages"]):  # decoding images is CPU work: not on the loop
            return await asyncio.to_thread(prepare_request, body, entry, shown, self._rules.request)
        return prepare_request(body, entry, shown, self._rules.request)

    async def _template_check(self, entry: RegistryEntry, registry_dir: Path) -> TemplateCheck:
        cached = self._templates.get(id(entry))
        if cached is not None and cached[0] is entry:
            return cached[1]
        check = await asyncio.to_thread(check_chat_template, entry, registry_dir)
        if len(self._templates) > 1024:  # entries of old registry snapshots
            self._templates.clear()
        self._templates[id(entry)] = (entry, check)
        return check

    def _normalize_completion(
        self, content: bytes, parsed: dict[str, Any]
    ) -> tuple[bytes, dict[str, Any]]:
        """Tool calls and think tags in a whole answer; the backend's bytes if nothing changes."""
        result = parsed
        if self._rules.normalize_tools:
            result = normalize_completion(result)
        if self._rules.split_think_tags:
            result = split_think_completion(result)
        if result is parsed:
            return content, parsed
        return json_bytes(result), result

    async def _open(
        self, entry: RegistryEntry, body: dict[str, Any], stream: bool
    ) -> _Completed | _OpenStream:
        """Lease the backend and send the request: the whole answer, or an open stream that
        keeps the lease until it ends."""
        stack = AsyncExitStack()
        try:
            backend = self._router.backend_for(entry)
            target: Target = await stack.enter_async_context(backend.lease(entry))
            native_ollama = entry.backend == "ollama" and needs_native_ollama(body, entry)
            num_ctx = ollama_num_ctx(entry)
            if not stream:
                try:
                    if native_ollama:
                        completion = await self._forwarder.complete_ollama(target, body, num_ctx)
                    else:
                        completion = await self._forwarder.complete(target, body)
                except ProxyError as failure:
                    raise _explain_preemption(failure, target) from failure
                return _Completed(completion.status, completion.content, completion.parsed)
            if native_ollama:
                upstream = await self._forwarder.open_ollama_stream(target, body, num_ctx)
            else:
                upstream = await self._forwarder.open_stream(target, body)
            stack.push_async_callback(upstream.aclose)
            return _OpenStream(upstream, stack.pop_all())
        except BackendNotReady as exc:
            raise _not_ready(exc) from exc
        finally:
            with anyio.CancelScope(shield=True):
                await stack.aclose()

    async def _relay(self, exchange: Exchange, opened: _OpenStream) -> AsyncGenerator[bytes, None]:
        """Pass the backend's events through one by one; end with [DONE] whatever happens."""
        exchange.relay_started = True
        outcome: Outcome = "cancelled"
        status = CLIENT_CLOSED
        error: str | None = "client disconnected"
        normalizer = EventNormalizer(
            tools=self._rules.normalize_tools, split_think=self._rules.split_think_tags
        )
        try:
            async for received in opened.upstream.events():
                if received.strip() in _DONE_EVENTS:
                    break  # the end: nothing the backend sends after it matters
                event = normalizer.process(received)
                if exchange.first_token is None or b'"usage"' in event or self._log_prompts:
                    self._observe_event(exchange, event)
                yield event
            if (last := normalizer.flush()) is not None:
                yield last
            # Complete before [DONE] goes out: a client that hangs up as soon as it reads it
            # (the OpenAI SDK does) has not cancelled anything.
            outcome, status, error = "ok", 200, None
            yield SSE_DONE
        except ProxyError as raised:
            failure = _explain_preemption(raised, opened.upstream.target)
            outcome, status, error = "error", failure.status, failure.message
            yield sse_error(failure)
            yield SSE_DONE
        finally:
            with anyio.CancelScope(shield=True):
                await opened.stack.aclose()
            self._finish(exchange, status, outcome, error)

    async def _relay_when_loaded(
        self, exchange: Exchange, opening: asyncio.Future[_Completed | _OpenStream]
    ) -> AsyncGenerator[bytes, None]:
        """Heartbeat comments while the model loads, then the stream (or an error event)."""
        exchange.relay_started = True
        began = time.monotonic()
        model = exchange.entry.name if exchange.entry else "the model"
        handed_over = False
        try:
            while not (await asyncio.wait({opening}, timeout=self._rules.stream_heartbeat_s))[0]:
                yield f": loading {model} {time.monotonic() - began:.0f}s\n\n".encode()
            try:
                opened = opening.result()
            except ProxyError as failure:
                handed_over = True  # nothing is open; the failure is recorded here
                self._finish(exchange, failure.status, "error", failure.message)
                yield sse_error(failure)
                yield SSE_DONE
                return
            assert isinstance(opened, _OpenStream)  # a streaming request opens a stream
            handed_over = True
            async for event in self._relay(exchange, opened):
                yield event
        finally:
            if not handed_over:  # the client left while the model loaded
                with anyio.CancelScope(shield=True):
                    await self._discard(exchange, opening)

    async def _close_unloaded(
        self, exchange: Exchange, opening: asyncio.Future[_Completed | _OpenStream]
    ) -> None:
        """A client gone before the heartbeat relay ran: stop the load, or close the stream."""
        if not exchange.relay_started:
            await self._discard(exchange, opening)

    async def _discard(
        self, exchange: Exchange, opening: asyncio.Future[_Completed | _OpenStream]
    ) -> None:
        """Give up on a load (or on the stream it opened) for a client that has left."""
        await _cancel(opening)
        if opening.done() and not opening.cancelled() and opening.exception() is None:
            opened = opening.result()
            if isinstance(opened, _OpenStream):
                with anyio.CancelScope(shield=True):
                    await opened.stack.aclose()
        self._finish(exchange, CLIENT_CLOSED, "cancelled", "client disconnected")

    async def _close_unstarted(self, exchange: Exchange, opened: _OpenStream) -> None:
        """A client gone before the first event: the relay never ran, so its cleanup is here."""
        if exchange.relay_started:
            return
        with anyio.CancelScope(shield=True):
            await opened.stack.aclose()
        self._finish(exchange, CLIENT_CLOSED, "cancelled", "client disconnected")

    def _observe_event(self, exchange: Exchange, event: bytes) -> None:
        """Read an event for bookkeeping only; what the client gets is the original bytes."""
        data = event.strip()
        if not data.startswith(b"data:"):
            return
        try:
            chunk = json.loads(data[5:])
        except ValueError:
            return
        if not isinstance(chunk, dict):
            return
        if chunk.get("usage"):
            exchange.usage = usage_of(chunk)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            content = delta.get("content")
            if (content or delta.get("tool_calls")) and exchange.first_token is None:
                exchange.first_token = time.perf_counter()
            if self._log_prompts and isinstance(content, str):
                exchange.response_text.append(content)

    def _finish(self, exchange: Exchange, status: int, outcome: Outcome, error: str | None) -> None:
        record = exchange.record(status, outcome, error, self._log_prompts)
        self._log.write(record)
        self._metrics.request_finished(record)


@dataclass(frozen=True, slots=True)
class _Completed:
    status: int
    content: bytes
    parsed: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _OpenStream:
    upstream: UpstreamStream
    stack: AsyncExitStack  # holds the lease and the upstream response


class _ClientLeft(Exception):
    pass


async def _opened_in_time(
    opening: asyncio.Future[Any],
    timeout_s: float | None,
    client_gone: Callable[[], Awaitable[None]],
) -> bool:
    """Wait for `opening` up to `timeout_s` (None: as long as it takes): True once it is done,
    False at the timeout. A client that disconnects first cancels it (and the upstream request
    with it) and raises _ClientLeft."""
    watcher = asyncio.ensure_future(client_gone())
    try:
        done, _ = await asyncio.wait(
            {opening, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:  # the request itself is cancelled (server shutdown)
        opening.cancel()
        raise
    finally:
        watcher.cancel()
    if opening.done():
        return True
    if watcher in done:
        await _cancel(opening)
        raise _ClientLeft
    return False


async def _cancel(task: asyncio.Future[Any]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ProxyError):
        await task


def _not_ready(exc: BackendNotReady) -> ProxyError:
    return BackendUnavailable(str(exc), code="backend_not_ready")


def _explain_preemption(failure: ProxyError, target: Target) -> ProxyError:
    """A request whose model was stopped under it (drain timeout) fails with that reason,
    not with the "connection closed" it saw."""
    reason = target.preempted()
    if reason is None:
        return failure
    return BackendUnavailable(reason, code="model_swapped_out")
