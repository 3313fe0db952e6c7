"""One model request, from request bytes to its last byte, under one owner, for every endpoint.

`ChatService.handle` returns a `TaskResponse` whose single task runs the whole request: parse,
resolve, check that the entry serves the endpoint, shape, lease the backend, forward, relay the
stream. `_serve` holds all of it in one try/except/finally: whatever ends the request (an
answer, a ProxyError, a bug, the client leaving at any step) settles the outcome on its
`Exchange`, and the `finally` records it (log line, metrics, in-flight count) exactly once.

What differs by endpoint is a `Flow` (chat_flow.py for chat completions, passthrough.py for
completions, embeddings and responses): how its body is parsed and shaped, how it is forwarded,
and how an error reaches a client whose stream has begun. Resolution, the slot lease, timeouts,
heartbeats, preemption and the record are the same for all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from starlette.responses import Response

from imageworks.backends.base import BackendBusy, BackendNotReady, Dialect, Target
from imageworks.backends.endpoints import Endpoint, served_endpoints, unserved_message
from imageworks.backends.router import BackendRouter
from imageworks.chat_proxy.catalog import Catalog
from imageworks.chat_proxy.chat_flow import ChatFlow, TemplateGate
from imageworks.chat_proxy.exchange import Exchange
from imageworks.chat_proxy.forwarding import Forwarder
from imageworks.chat_proxy.normalize.request import RequestRules
from imageworks.chat_proxy.observe import Metrics, RequestLog
from imageworks.chat_proxy.passthrough import CompletionsFlow, EmbeddingsFlow, ResponsesFlow
from imageworks.chat_proxy.prometheus import PrometheusMetrics
from imageworks.chat_proxy.protocol import (
    BackendUnavailable,
    InternalError,
    InvalidRequest,
    ProxyError,
    QueueTimeout,
)
from imageworks.chat_proxy.sse import ClientGone, Reply, TaskResponse, shielded
from imageworks.chat_proxy.timing import RequestTiming, Wait
from imageworks.registry.entry_cache import PerEntry
from imageworks.registry.errors import RegistryError
from imageworks.registry.naming import display_name
from imageworks.registry.schema import RegistryEntry

log = logging.getLogger("imageworks.chat_proxy")

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
    # The server CHAT_PROXY_LLAMACPP_LAUNCHER starts, for which endpoints llama.cpp entries have.
    llamacpp_dialect: Dialect = Dialect.LLAMA_SERVER


class ModelRequest(Protocol):
    """What the owner reads of any endpoint's typed request."""

    @property
    def model(self) -> str: ...

    @property
    def stream(self) -> bool | None: ...


R = TypeVar("R", bound=ModelRequest)


class Flow(Protocol[R]):
    """What is particular to one endpoint; every method may raise ProxyError."""

    endpoint: Endpoint

    def parse(self, raw: bytes) -> R: ...

    def prompt_of(self, body: R) -> Any:
        """What the request log keeps of the request when prompts are logged."""
        ...

    async def prepare(self, body: R, entry: RegistryEntry, registry_dir: Path) -> R: ...

    async def forward(
        self, exchange: Exchange, entry: RegistryEntry, body: R, target: Target, reply: Reply
    ) -> None:
        """Send it to `target` and answer; settles `exchange` once the answer is complete."""
        ...

    async def fail(self, exchange: Exchange, reply: Reply, error: ProxyError) -> None:
        """The error as this endpoint's clients read it (a status, or a stream's last event)."""
        ...


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
        self._log = request_log
        self._metrics = metrics
        self._prometheus = prometheus
        self._rules = rules
        self._log_prompts = rules.log_prompts
        # entry -> the endpoints it serves, per registry snapshot (a few µs saved per request)
        self._served: PerEntry[tuple[Endpoint, ...]] = PerEntry()
        templates = TemplateGate(rules.require_template)
        renames = rules.requested_model_in_answers
        chat = ChatFlow(
            forwarder,
            templates,
            rules.request,
            normalize_tools=rules.normalize_tools,
            split_think_tags=rules.split_think_tags,
            log_prompts=rules.log_prompts,
            requested_model_in_answers=renames,
        )
        self._chat: Flow[Any] = chat
        self._flows: dict[Endpoint, Flow[Any]] = {
            Endpoint.CHAT: chat,
            Endpoint.COMPLETIONS: CompletionsFlow(forwarder, rules.log_prompts, renames),
            Endpoint.EMBEDDINGS: EmbeddingsFlow(forwarder, rules.log_prompts, renames),
            Endpoint.RESPONSES: ResponsesFlow(forwarder, rules.log_prompts, templates),
        }

    def handle(
        self,
        raw_body: bytes,
        timing: RequestTiming | None = None,
        endpoint: Endpoint = Endpoint.CHAT,
    ) -> Response:
        """The response for a body sent to `endpoint`; the request runs when it is sent.
        `timing` (the Server-Timing middleware's) learns where the request's time went."""
        flow = self._chat if endpoint is Endpoint.CHAT else self._flows[endpoint]
        return TaskResponse(
            lambda reply: self._serve(flow, raw_body, reply, timing or RequestTiming())
        )

    def refused(self, error: ProxyError, endpoint: Endpoint = Endpoint.CHAT) -> None:
        """Record a request refused before it could be read (its body was too large)."""
        exchange = Exchange(endpoint=endpoint.path)
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

    async def _serve(
        self, flow: Flow[Any], raw_body: bytes, reply: Reply, timing: RequestTiming
    ) -> None:
        """The one owner of a request: its outcome is recorded here, once, whatever ends it."""
        exchange = Exchange(timing=timing, endpoint=flow.endpoint.path)
        try:
            await self._answer(flow, exchange, raw_body, reply)
        except ProxyError as error:
            exchange.end(error.status, "error", error.message)
            await flow.fail(exchange, reply, error)
        except ClientGone:
            pass  # cancelled, unless the answer was already complete
        except Exception as exc:  # a bug: the client still gets an OpenAI error, the log the trace
            log.error("request %s failed", exchange.request_id, exc_info=exc)
            exchange.end(500, "error", f"{type(exc).__name__}: {exc}")
            internal = InternalError(f"Internal proxy error: {type(exc).__name__}")
            await flow.fail(exchange, reply, internal)
        finally:  # also when cancelled (client gone, server shutting down): 499 unless ended
            self._record(exchange)

    async def _answer(
        self, flow: Flow[Any], exchange: Exchange, raw_body: bytes, reply: Reply
    ) -> None:
        if len(raw_body) > _PARSE_IN_THREAD_BYTES:
            body = await asyncio.to_thread(flow.parse, raw_body)
        else:
            body = flow.parse(raw_body)
        exchange.model_requested = body.model
        exchange.stream = bool(body.stream)
        if self._log_prompts:
            exchange.prompt = flow.prompt_of(body)
        entry, registry_dir = await self._resolve(body.model)
        exchange.entry = entry
        self._metrics.request_started(entry.name)  # request_finished takes it back
        self._require_endpoint(entry, flow.endpoint)
        body = await flow.prepare(body, entry, registry_dir)
        if exchange.stream:  # while the model loads: the headers, then `: loading` comments
            reply.keep_alive(self._rules.stream_heartbeat_s, lambda: f"loading {entry.name}")
        async with self._lease(entry, exchange.timing.queue) as target:
            exchange.safe_mode = target.safe_mode
            try:
                await flow.forward(exchange, entry, body, target, reply)
            except ProxyError as failure:
                explained = _explain_preemption(failure, target)
                if explained is failure:
                    raise
                raise explained from failure

    def _require_endpoint(self, entry: RegistryEntry, endpoint: Endpoint) -> None:
        """Refused before the slot is touched: no model is swapped for a request it cannot serve."""
        served = self._served.get(entry)
        if served is None:
            served = self._served.put(entry, served_endpoints(entry, self._rules.llamacpp_dialect))
        if endpoint not in served:
            raise InvalidRequest(
                unserved_message(display_name(entry), endpoint, served),
                param="model",
                code="unsupported_endpoint",
            )

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

    async def _resolve(self, model: str) -> tuple[RegistryEntry, Path]:
        try:
            view = await self._catalog.view()
        except RegistryError as exc:
            raise BackendUnavailable(f"The model registry cannot be read: {exc}") from exc
        return self._catalog.resolve(view, model), view.snapshot.directory


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
