"""ChatService as one owner per request, with fakes at its seams: a scripted lease (the GPU
slot's contract), a scripted aiohttp upstream on loopback (the forwarder's session resolves the
target's host to it), and an in-memory request log."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from conftest import write_json
from imageworks.backends.base import BackendBusy, BackendNotReady, Dialect, Target
from imageworks.backends.router import BackendRouter
from imageworks.chat_proxy.catalog import Catalog
from imageworks.chat_proxy.chat import ChatService
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.forwarding import Forwarder
from imageworks.chat_proxy.observe import Metrics, RequestLog, RequestRecord
from imageworks.chat_proxy.protocol import QueueTimeout
from imageworks.chat_proxy.services import chat_rules
from imageworks.chat_proxy.timing import ServerTiming, request_timing
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.store import RegistryStore

pytestmark = pytest.mark.timeout(10)

Lease = Callable[[], AbstractAsyncContextManager[Target]]
TARGET = Target(base_url="http://upstream.test/v1", model="m", label="external:m")


class FakeBackend:
    """A backend whose lease the test scripts; it notes when the lease is let go."""

    def __init__(self, lease: Lease | None = None) -> None:
        self._lease = lease or self._granted
        self.released = asyncio.Event()

    def lease(self, entry: RegistryEntry) -> AbstractAsyncContextManager[Target]:
        return self._lease()

    @asynccontextmanager
    async def _granted(self) -> AsyncIterator[Target]:
        try:
            yield TARGET
        finally:
            self.released.set()


class MemoryLog(RequestLog):
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def write(self, record: RequestRecord) -> None:
        self.records.append(record)


class Harness:
    def __init__(self, service: ChatService, log: MemoryLog, metrics: Metrics) -> None:
        self.service = service
        self.log = log
        self.metrics = metrics

    @property
    def in_flight(self) -> int:
        return int(self.metrics.snapshot()["overall"]["in_flight"])

    async def send(
        self, body: dict[str, Any], *, leave: asyncio.Event | None = None, timed: bool = False
    ) -> list[dict[str, Any]]:
        """The ASGI messages the response sends; the client leaves when `leave` is set.
        `timed`: through the Server-Timing middleware, as the app serves it."""
        sent: list[dict[str, Any]] = []
        gone = leave or asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(message)

        raw = json.dumps(body).encode()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await self.service.handle(raw, request_timing(scope))(scope, receive, send)

        await (ServerTiming(app) if timed else app)({"type": "http"}, receive, send)
        return sent


Upstream = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _echo(request: web.Request) -> web.StreamResponse:
    choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}}
    return web.json_response({"object": "chat.completion", "choices": [choice]})


class ScriptedUpstream:
    """An aiohttp server on loopback answering with whichever `Upstream` a test chose."""

    def __init__(self) -> None:
        self.answer: Upstream = _echo
        self.port = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self.answer(request)


class ToUpstream(AbstractResolver):
    """Resolves every host to the scripted upstream (TARGET's host is not a real name)."""

    def __init__(self, port: int) -> None:
        self._port = port

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[ResolveResult]:
        address: ResolveResult = {
            "hostname": host,
            "host": "127.0.0.1",
            "port": self._port,
            "family": 2,  # AF_INET
            "proto": 0,
            "flags": 0,
        }
        return [address]

    async def close(self) -> None:
        pass


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    scripted = ScriptedUpstream()
    # handler_cancellation: a handler whose client (the proxy) hung up stops, as a backend would.
    server = web.Server(scripted.handle, handler_cancellation=True)
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    scripted.port = runner.addresses[0][1]
    yield scripted
    await runner.cleanup()


@pytest.fixture
async def session(upstream: ScriptedUpstream) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(resolver=ToUpstream(upstream.port))
    async with aiohttp.ClientSession(connector=connector) as client:
        yield client


@pytest.fixture
def make(
    tmp_path: Path, upstream: ScriptedUpstream, session: aiohttp.ClientSession
) -> Callable[..., Harness]:
    scripted = upstream

    def build(backend: FakeBackend, answer: Upstream = _echo, heartbeat_s: float = 5.0) -> Harness:
        write_json(
            tmp_path / "model_registry.curated.json",
            [{"name": "m", "backend": "external", "backend_config": {"base_url": TARGET.base_url}}],
        )
        settings = ProxySettings(stream_heartbeat_s=heartbeat_s, log_path=tmp_path / "log")
        catalog = Catalog(
            RegistryStore(tmp_path), settings, ollama_host="http://127.0.0.1:9", served_source=None
        )
        router = BackendRouter(
            managed=backend, ollama=backend, external=backend, vllm_single_port=True
        )
        scripted.answer = answer
        forwarder = Forwarder(session, backend_timeout_s=5, stream_idle_timeout_s=5)
        log, metrics = MemoryLog(), Metrics()
        service = ChatService(catalog, router, forwarder, log, metrics, chat_rules(settings))
        return Harness(service, log, metrics)

    return build


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def status_and_body(sent: list[dict[str, Any]]) -> tuple[int, dict[str, str], bytes]:
    headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def failing_lease(error: BaseException, after_s: float = 0.0) -> Lease:
    @asynccontextmanager
    async def lease() -> AsyncIterator[Target]:
        await asyncio.sleep(after_s)
        raise error
        yield TARGET  # pragma: no cover - never granted

    return lease


async def test_chat_answer_is_recorded_once_as_ok(make: Callable[..., Harness]) -> None:
    backend = FakeBackend()
    harness = make(backend)
    status, _, body = status_and_body(await harness.send(chat()))
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "hi"
    (record,) = harness.log.records
    assert (record.outcome, record.status) == ("ok", 200)
    assert backend.released.is_set()
    assert harness.in_flight == 0


async def test_chat_bug_in_a_step_is_a_500_recorded_once(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    harness = make(FakeBackend(failing_lease(RuntimeError("boom"))))
    status, _, body = status_and_body(await harness.send(chat()))
    assert status == 500
    assert json.loads(body) == {
        "error": {
            "message": "Internal proxy error: RuntimeError",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    (record,) = harness.log.records
    assert (record.outcome, record.status) == ("error", 500)
    assert record.error is not None
    assert "boom" in record.error
    assert harness.in_flight == 0
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], RuntimeError)


async def test_chat_bug_after_the_stream_began_is_an_error_event(
    make: Callable[..., Harness],
) -> None:
    harness = make(FakeBackend(failing_lease(RuntimeError("boom"), after_s=0.2)), heartbeat_s=0.05)
    status, _, body = status_and_body(await harness.send(chat(stream=True)))
    assert status == 200
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[0].startswith(": loading m")
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "internal_error"
    assert events[-1] == "data: [DONE]"
    assert [r.outcome for r in harness.log.records] == ["error"]


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_busy_backend_is_503_queue_timeout_with_retry_after(
    make: Callable[..., Harness], stream: bool
) -> None:
    harness = make(FakeBackend(failing_lease(BackendBusy("the GPU is busy", 2.2))))
    status, headers, body = status_and_body(await harness.send(chat(stream=stream)))
    assert status == 503
    assert headers["retry-after"] == "3"
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("backend_error", "queue_timeout")
    assert "the GPU is busy" in error["message"]
    (record,) = harness.log.records
    assert (record.outcome, record.status) == ("error", 503)


async def test_chat_busy_backend_after_heartbeats_is_an_error_event(
    make: Callable[..., Harness],
) -> None:
    lease = failing_lease(BackendBusy("the GPU is busy", 2.2), after_s=0.2)
    harness = make(FakeBackend(lease), heartbeat_s=0.05)
    status, headers, body = status_and_body(await harness.send(chat(stream=True)))
    assert status == 200
    assert "retry-after" not in headers
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[0].startswith(": loading m")
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "queue_timeout"
    assert events[-1] == "data: [DONE]"


async def test_chat_backend_not_ready_is_503_without_retry_after(
    make: Callable[..., Harness],
) -> None:
    harness = make(FakeBackend(failing_lease(BackendNotReady("m could not be started"))))
    status, headers, body = status_and_body(await harness.send(chat()))
    assert status == 503
    assert "retry-after" not in headers
    assert json.loads(body)["error"]["code"] == "backend_not_ready"


@pytest.mark.parametrize(
    ("wait_s", "header"), [(0.2, "1"), (1.0, "1"), (2.0, "2"), (2.01, "3"), (float("inf"), "1")]
)
def test_queue_timeout_retry_after_is_whole_seconds_at_least_one(
    wait_s: float, header: str
) -> None:
    assert QueueTimeout("busy", wait_s).headers() == {"Retry-After": header}


async def test_chat_client_leaving_while_waiting_for_the_lease_withdraws_at_once(
    make: Callable[..., Harness],
) -> None:
    waiting, withdrawn = asyncio.Event(), asyncio.Event()

    @asynccontextmanager
    async def slow_lease() -> AsyncIterator[Target]:
        waiting.set()
        try:
            await asyncio.Event().wait()  # the model never finishes loading
        finally:
            withdrawn.set()
        yield TARGET  # pragma: no cover

    harness = make(FakeBackend(slow_lease))
    leave = asyncio.Event()
    answer = asyncio.ensure_future(harness.send(chat(), leave=leave))
    await waiting.wait()
    leave.set()
    assert await answer == []  # nothing was sent: the client had gone
    assert withdrawn.is_set()
    (record,) = harness.log.records
    assert (record.outcome, record.status) == ("cancelled", 499)
    assert harness.in_flight == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_client_leaving_while_the_backend_answers_releases_the_lease(
    make: Callable[..., Harness], stream: bool
) -> None:
    asked = asyncio.Event()

    async def hanging(request: web.Request) -> web.StreamResponse:
        asked.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    backend = FakeBackend()
    harness = make(backend, hanging)
    leave = asyncio.Event()
    answer = asyncio.ensure_future(harness.send(chat(stream=stream), leave=leave))
    await asked.wait()
    leave.set()
    await answer
    assert backend.released.is_set()
    (record,) = harness.log.records
    assert (record.outcome, record.status) == ("cancelled", 499)
    assert harness.in_flight == 0


async def test_chat_stream_the_backend_ends_with_an_error_event_is_an_error_said_once(
    make: Callable[..., Harness],
) -> None:
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
    failure = {"error": {"message": "CUDA out of memory", "type": "server_error"}}
    sse = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in (role, failure))

    async def failing(request: web.Request) -> web.StreamResponse:
        return await event_stream(request, [sse, b"data: [DONE]\n\n"])

    harness = make(FakeBackend(), failing)
    status, _, body = status_and_body(await harness.send(chat(stream=True)))
    assert status == 200
    events = [e for e in body.decode().split("\n\n") if e]
    assert [json.loads(e.removeprefix("data: ")) for e in events[:-1]] == [role, failure]
    assert events[-1] == "data: [DONE]"
    (record,) = harness.log.records
    assert (record.outcome, record.status, record.error) == ("error", 502, "CUDA out of memory")


def granted(target: Target) -> Lease:
    @asynccontextmanager
    async def lease() -> AsyncIterator[Target]:
        yield target

    return lease


STREAM = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"hi there"},"finish_reason":null}]}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)


async def event_stream(request: web.Request, chunks: list[bytes]) -> web.StreamResponse:
    """A server-sent event stream, written chunk by chunk."""
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


def vllm_without_usage(tokenize_status: int, tokenize_body: dict[str, Any]) -> Upstream:
    async def upstream(request: web.Request) -> web.StreamResponse:
        if request.path == "/tokenize":
            return web.json_response(tokenize_body, status=tokenize_status)
        return await event_stream(request, [STREAM])

    return upstream


def usage_of_events(body: bytes) -> list[dict[str, Any]]:
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    return [chunk["usage"] for chunk in chunks if chunk.get("usage")]


async def test_chat_stream_usage_counted_by_the_backend_tokenizer(
    make: Callable[..., Harness],
) -> None:
    vllm = Target(TARGET.base_url, "m", "vllm:m", dialect=Dialect.VLLM)
    harness = make(FakeBackend(granted(vllm)), vllm_without_usage(200, {"count": 4}))
    sent = await harness.send(chat(stream=True, stream_options={"include_usage": True}))
    _, _, body = status_and_body(sent)
    assert usage_of_events(body) == [
        {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    ]
    (record,) = harness.log.records
    assert (record.outcome, record.prompt_tokens, record.completion_tokens) == ("ok", 4, 5)


async def test_chat_stream_usage_the_backend_cannot_count_is_left_out(
    make: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    vllm = Target(TARGET.base_url, "m", "vllm:m", dialect=Dialect.VLLM)
    broken = {"error": "tokenizer crashed"}
    harness = make(FakeBackend(granted(vllm)), vllm_without_usage(500, broken))
    sent = await harness.send(chat(stream=True, stream_options={"include_usage": True}))
    _, _, body = status_and_body(sent)
    assert usage_of_events(body) == []
    (record,) = harness.log.records
    assert (record.outcome, record.prompt_tokens) == ("ok", None)
    assert "could not count" in caplog.text


def server_timing(headers: dict[str, str]) -> dict[str, float]:
    entries = [entry.split(";dur=") for entry in headers["server-timing"].split(", ")]
    return {name: float(duration) for name, duration in entries}


def late_lease(after_s: float) -> Lease:
    @asynccontextmanager
    async def lease() -> AsyncIterator[Target]:
        await asyncio.sleep(after_s)  # the model loads
        yield TARGET

    return lease


async def test_chat_time_is_split_into_queue_upstream_and_proxy(
    make: Callable[..., Harness],
) -> None:
    async def slow_echo(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.05)
        return await _echo(request)

    harness = make(FakeBackend(late_lease(0.1)), slow_echo)
    status, headers, _ = status_and_body(await harness.send(chat(), timed=True))
    assert status == 200
    timing = server_timing(headers)
    assert list(timing) == ["queue", "upstream", "proxy"]
    assert timing["queue"] >= 100
    assert timing["upstream"] >= 50
    (record,) = harness.log.records  # the log line says what the header said
    assert (record.queue_ms, record.upstream_ms, record.proxy_ms) == pytest.approx(
        (timing["queue"], timing["upstream"], timing["proxy"]), abs=0.06
    )


async def test_chat_stream_headers_sent_while_the_model_loads_carry_the_wait_so_far(
    make: Callable[..., Harness],
) -> None:
    harness = make(FakeBackend(late_lease(0.3)), heartbeat_s=0.05)
    status, headers, _ = status_and_body(await harness.send(chat(stream=True), timed=True))
    assert status == 200
    timing = server_timing(headers)
    assert list(timing) == ["queue", "proxy"]  # the backend had not been asked yet
    assert timing["queue"] >= 50
    (record,) = harness.log.records
    assert record.queue_ms is not None
    assert record.queue_ms >= 300
    assert record.upstream_ms is not None
    assert record.proxy_ms is not None
    assert 0 <= record.proxy_ms < record.queue_ms / 2  # the load was not the proxy's time


async def test_chat_without_the_middleware_records_no_proxy_time(
    make: Callable[..., Harness],
) -> None:
    harness = make(FakeBackend())
    await harness.send(chat())
    (record,) = harness.log.records
    assert record.upstream_ms is not None
    assert record.proxy_ms is None  # nobody saw the headers go out
