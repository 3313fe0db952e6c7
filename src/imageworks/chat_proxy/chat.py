"""One chat completion, from request bytes to its last byte, under one owner.

`ChatService.handle` returns a `TaskResponse` whose single task runs the whole request: parse,
resolve, shape, lease the backend, forward, relay the stream. `_serve` holds all of it in one
try/except/finally: whatever ends the request (an answer, a ProxyError, a bug, the client
leaving at any step) settles the outcome on its `Exchange`, and the `finally` records it (log
line, metrics, in-flight count) exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.responses import Response

from imageworks.backends.base import BackendBusy, BackendNotReady, Dialect, Target
from imageworks.backends.router import BackendRouter
from imageworks.backends.templates import TemplateCheck, check_chat_template
from imageworks.chat_proxy.catalog import Catalog
from imageworks.chat_proxy.exchange import Exchange, usage_of
from imageworks.chat_proxy.forwarding import Completion, Forwarder, UpstreamStream
from imageworks.chat_proxy.normalize.ollama_path import needs_native_ollama, ollama_num_ctx
from imageworks.chat_proxy.normalize.reasoning import split_think_completion
from imageworks.chat_proxy.normalize.request import RequestRules, prepare_request
from imageworks.chat_proxy.normalize.response import ModelRenamer, complete_answer
from imageworks.chat_proxy.normalize.stream import EventNormalizer, backend_error
from imageworks.chat_proxy.normalize.structured import structured_for
from imageworks.chat_proxy.normalize.tools import normalize_completion
from imageworks.chat_proxy.normalize.vision import has_images
from imageworks.chat_proxy.observe import Metrics, RequestLog
from imageworks.chat_proxy.prometheus import PrometheusMetrics
from imageworks.chat_proxy.protocol import (
    BackendUnavailable,
    BadGateway,
    InternalError,
    InvalidRequest,
    ProxyError,
    QueueTimeout,
    StreamTruncated,
    json_bytes,
    parse_json,
    sse_event,
)
from imageworks.chat_proxy.requests import (
    RESPONSE_FORMAT,
    ChatCompletionRequest,
    as_json_data,
    parse_chat_request,
    replace,
)
from imageworks.chat_proxy.sse import ClientGone, Reply, TaskResponse, shielded
from imageworks.chat_proxy.timing import RequestTiming, Wait
from imageworks.chat_proxy.usage import StreamUsage, tokenizer_for
from imageworks.registry.errors import RegistryError
from imageworks.registry.naming import display_name
from imageworks.registry.schema import RegistryEntry

log = logging.getLogger("imageworks.chat_proxy")

_DONE_EVENTS = (b"data: [DONE]", b"data:[DONE]")

# Backends whose servers render the chat template themselves from the weights (Ollama embeds
# it in its model files; external servers are someone else's business).
TEMPLATED_BACKENDS = frozenset({"vllm", "llamacpp"})
# Bodies larger than this are parsed in a thread, so the event loop keeps serving meanwhile.
_PARSE_IN_THREAD_BYTES = 1_000_000


@dataclass(frozen=True, slots=True)
class ChatRules:
    """Settings that decide how requests and answers are shaped."""

    request: RequestRules
    require_template: bool
    normalize_tools: bool
    split_think_tags: bool
    log_prompts: bool
    stream_heartbeat_s: float = 5.0
    # Answers name the model as the client asked for it (else as the backend serves it).
    requested_model_in_answers: bool = True


class ChatService:
    def __init__(
        self,
        catalog: Catalog,
        router: BackendRouter,
        forwarder: Forwarder,
        request_log: RequestLog,
        metrics: Metrics,
        rules: ChatRules,
        prometheus: PrometheusMetrics | None = None,
    ) -> None:
        self._catalog = catalog
        self._router = router
        self._forwarder = forwarder
        self._log = request_log
        self._metrics = metrics
        self._prometheus = prometheus
        self._rules = rules
        self._log_prompts = rules.log_prompts
        # entry -> template check, per registry snapshot (entries are replaced on reload)
        self._templates: dict[int, tuple[RegistryEntry, TemplateCheck]] = {}

    def handle(self, raw_body: bytes, timing: RequestTiming | None = None) -> Response:
        """The response for a `/v1/chat/completions` body; the request runs when it is sent.
        `timing` (the Server-Timing middleware's) learns where the request's time went."""
        return TaskResponse(lambda reply: self._serve(raw_body, reply, timing or RequestTiming()))

    def refused(self, error: ProxyError) -> None:
        """Record a request refused before it could be read (its body was too large)."""
        exchange = Exchange()
        exchange.end(error.status, "error", error.message)
        self._record(exchange)

    async def activate(self, model: str) -> None:
        """Make `model`'s backend ready without a request (the admin endpoint); ProxyErrors."""
        entry, _ = await self._resolve(model)
        async with self._lease(entry):
            pass

    def _record(self, exchange: Exchange) -> None:
        """The one place a finished request is written down: log line, metrics, in-flight."""
        record = exchange.record(self._log_prompts)
        self._log.write(record)
        self._metrics.request_finished(record)
        if self._prometheus is not None:
            self._prometheus.request_finished(record)

    async def _serve(self, raw_body: bytes, reply: Reply, timing: RequestTiming) -> None:
        """The one owner of a request: its outcome is recorded here, once, whatever ends it."""
        exchange = Exchange(timing=timing)
        try:
            await self._answer(exchange, raw_body, reply)
        except ProxyError as error:
            exchange.end(error.status, "error", error.message)
            await reply.fail(error)
        except ClientGone:
            pass  # cancelled, unless the answer was already complete
        except Exception as exc:  # a bug: the client still gets an OpenAI error, the log the trace
            log.error("request %s failed", exchange.request_id, exc_info=exc)
            exchange.end(500, "error", f"{type(exc).__name__}: {exc}")
            await reply.fail(InternalError(f"Internal proxy error: {type(exc).__name__}"))
        finally:  # also when cancelled (client gone, server shutting down): 499 unless ended
            self._record(exchange)

    async def _answer(self, exchange: Exchange, raw_body: bytes, reply: Reply) -> None:
        if len(raw_body) > _PARSE_IN_THREAD_BYTES:
            body = await asyncio.to_thread(parse_chat_request, raw_body)
        else:
            body = parse_chat_request(raw_body)
        exchange.model_requested = body.model
        exchange.stream = bool(body.stream)
        if self._log_prompts:
            exchange.prompt = [as_json_data(message) for message in body.messages]
        entry, registry_dir = await self._resolve(body.model)
        exchange.entry = entry
        self._metrics.request_started(entry.name)  # request_finished takes it back
        body = await self._prepare(body, entry, registry_dir)
        if exchange.stream:  # while the model loads: the headers, then `: loading` comments
            reply.keep_alive(self._rules.stream_heartbeat_s, lambda: f"loading {entry.name}")
        async with self._lease(entry, exchange.timing.queue) as target:
            try:
                await self._forward(exchange, entry, body, target, reply)
            except ProxyError as failure:
                explained = _explain_preemption(failure, target)
                if explained is failure:
                    raise
                raise explained from failure

    @asynccontextmanager
    async def _lease(
        self, entry: RegistryEntry, queue: Wait | None = None
    ) -> AsyncIterator[Target]:
        """The entry's backend, ready and held for the block (the wait for it timed by `queue`).
        Whatever ends the block, the lease is left at once, and to the end even if the request
        is cancelled meanwhile."""
        leases = AsyncExitStack()
        try:
            backend = self._router.backend_for(entry)
            with queue or contextlib.nullcontext():
                target: Target = await leases.enter_async_context(backend.lease(entry))
        except BackendNotReady as exc:
            raise _not_ready(exc) from exc
        try:
            yield target
        finally:
            await shielded(leases.aclose())

    async def _forward(
        self,
        exchange: Exchange,
        entry: RegistryEntry,
        body: ChatCompletionRequest,
        target: Target,
        reply: Reply,
    ) -> None:
        body = _in_dialect(body, target.dialect)  # the server's form of response_format
        native_ollama = entry.backend == "ollama" and needs_native_ollama(body, entry)
        num_ctx = ollama_num_ctx(entry)
        requested = body.model if self._rules.requested_model_in_answers else None
        upstream_wait = exchange.timing.upstream
        if not exchange.stream:
            if native_ollama:
                completion = await self._forwarder.complete_ollama(
                    target, body, num_ctx, wait=upstream_wait
                )
            else:
                completion = await self._forwarder.complete(target, body, wait=upstream_wait)
            await self._send_completion(exchange, completion, reply, requested)
            return
        if native_ollama:
            upstream = await self._forwarder.open_ollama_stream(
                target, body, num_ctx, wait=upstream_wait
            )
        else:
            upstream = await self._forwarder.open_stream(target, body, wait=upstream_wait)
        renamer = None
        if requested is not None and requested != target.model:
            renamer = ModelRenamer(target.model, requested)
        try:
            await reply.open_stream()  # the backend has answered: no more `: loading`
            await self._relay(exchange, upstream, reply, renamer, self._usage(body, target))
        finally:
            await shielded(upstream.aclose())

    def _usage(self, body: ChatCompletionRequest, target: Target) -> StreamUsage | None:
        """How a stream's usage chunk is counted if the backend sends none: for a client that
        asked for one, from a backend that has a tokenizer endpoint."""
        options = body.stream_options
        if options is None or options.include_usage is not True:
            return None
        post = functools.partial(self._forwarder.backend_json, target)
        tokenizer = tokenizer_for(target.dialect, target.model, post)
        if tokenizer is None:
            return None
        return StreamUsage(tokenizer, as_json_data(body), target.label)

    async def _send_completion(
        self, exchange: Exchange, completion: Completion, reply: Reply, model: str | None
    ) -> None:
        content, parsed = self._normalize_completion(completion.content, completion.parsed, model)
        exchange.usage = usage_of(parsed)
        if self._log_prompts:
            exchange.response = parsed.get("choices")
        exchange.end(completion.status, "ok")
        await reply.whole(completion.status, content)

    async def _relay(
        self,
        exchange: Exchange,
        upstream: UpstreamStream,
        reply: Reply,
        renamer: ModelRenamer | None,
        usage: StreamUsage | None,
    ) -> None:
        """The backend's events, one by one as they come; then the usage chunk if the client
        asked for one and the backend sent none (counted), and `[DONE]` if the answer finished,
        else the error that says why it did not."""
        normalizer = EventNormalizer(
            tools=self._rules.normalize_tools, split_think=self._rules.split_think_tags
        )
        async for received in upstream.events():
            if received.strip() in _DONE_EVENTS:
                break  # the end: nothing the backend sends after it matters
            if (said := backend_error(received)) is not None:  # the backend gave up: say so
                exchange.end(BadGateway.status, "error", str(said.get("message") or said))
                await reply.event(received)
                await reply.done()
                return
            event = normalizer.process(received)
            if renamer is not None:
                event = renamer.event(event)
            if exchange.first_token is None or b'"usage"' in event or self._log_prompts:
                self._observe_event(exchange, event)
            if usage is not None and exchange.usage is None:
                usage.keep(event)
            await reply.event(event)
        if (last := normalizer.flush()) is not None:
            last = last if renamer is None else renamer.event(last)
            if usage is not None and exchange.usage is None:
                usage.keep(last)
            await reply.event(last)
        if not normalizer.finished:
            raise StreamTruncated(
                f"Backend {upstream.target.label} ended the stream before the answer was "
                "finished (no choice had a finish_reason); the answer is incomplete."
            )
        if usage is not None and exchange.usage is None:  # the backend did not report it
            counted = await usage.chunk()
            if counted is not None:
                exchange.usage = counted["usage"]
                await reply.event(sse_event(counted))
        # Settled before [DONE] goes out: a client that hangs up as soon as it reads it (the
        # OpenAI SDK does) has not cancelled anything.
        exchange.end(200, "ok")
        await reply.done()

    async def _resolve(self, model: str) -> tuple[RegistryEntry, Path]:
        try:
            view = await self._catalog.view()
        except RegistryError as exc:
            raise BackendUnavailable(f"The model registry cannot be read: {exc}") from exc
        return self._catalog.resolve(view, model), view.snapshot.directory

    async def _prepare(
        self, body: ChatCompletionRequest, entry: RegistryEntry, registry_dir: Path
    ) -> ChatCompletionRequest:
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
        if has_images(body.messages):  # decoding images is CPU work: not on the loop
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
        self, content: bytes, parsed: dict[str, Any], model: str | None
    ) -> tuple[bytes, dict[str, Any]]:
        """Tool calls, think tags and OpenAI's fields in a whole answer (`model`: the name it
        gives the model, None to keep the backend's); the backend's bytes if nothing changes."""
        result = parsed
        if self._rules.normalize_tools:
            result = normalize_completion(result)
        if self._rules.split_think_tags:
            result = split_think_completion(result)
        result = complete_answer(result, model)
        if result is parsed:
            return content, parsed
        return json_bytes(result), result

    def _observe_event(self, exchange: Exchange, event: bytes) -> None:
        """Read an event for bookkeeping only; what the client gets is the original bytes."""
        data = event.strip()
        if not data.startswith(b"data:"):
            return
        try:
            chunk = parse_json(data[5:])
        except (ValueError, UnicodeDecodeError):
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


def _in_dialect(request: ChatCompletionRequest, dialect: Dialect) -> ChatCompletionRequest:
    """`response_format` in the form the server takes (`structured_for` works on JSON data)."""
    if request.response_format is None:
        return request
    current = {"response_format": as_json_data(request.response_format)}
    shaped = structured_for(current, dialect)
    if shaped is current:
        return request
    response_format = RESPONSE_FORMAT.validate_python(shaped["response_format"])
    return replace(request, response_format=response_format)


def _not_ready(exc: BackendNotReady) -> ProxyError:
    if isinstance(exc, BackendBusy):
        return QueueTimeout(str(exc), exc.retry_after_s, code=exc.code)
    return BackendUnavailable(str(exc), code="backend_not_ready")


def _explain_preemption(failure: ProxyError, target: Target) -> ProxyError:
    """A request whose model was stopped under it (drain timeout) fails with that reason,
    not with the "connection closed" it saw."""
    reason = target.preempted()
    if reason is None:
        return failure
    return BackendUnavailable(reason, code="model_swapped_out")
