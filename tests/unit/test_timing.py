"""RequestTiming and the ServerTiming middleware: where a request's time went, on a fake clock."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.testclient import TestClient
from starlette.types import Receive, Scope, Send

from imageworks.chat_proxy.app import create_app
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.timing import RequestTiming, ServerTiming, request_timing
from imageworks.config import RegistrySettings

pytestmark = pytest.mark.timeout(10)

ENTRY = re.compile(r"^(queue|upstream|proxy);dur=\d+\.\d$")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_timing_header_names_only_the_proxy_when_nothing_was_waited_for() -> None:
    clock = Clock()
    timing = RequestTiming(clock)
    clock.advance(0.0009)
    assert timing.header(clock()) == b"proxy;dur=0.9"


def test_timing_header_splits_queue_upstream_and_proxy_in_milliseconds() -> None:
    clock = Clock()
    timing = RequestTiming(clock)
    clock.advance(0.001)
    with timing.queue:
        clock.advance(2.0)
    with timing.upstream:
        clock.advance(0.3124)
    clock.advance(0.0005)
    assert timing.header(clock()) == b"queue;dur=2000.0, upstream;dur=312.4, proxy;dur=1.5"


def test_timing_header_counts_a_wait_in_progress_up_to_now() -> None:
    # A stream's heartbeat sends the headers while the request still waits for its model.
    clock = Clock()
    timing = RequestTiming(clock)
    clock.advance(0.002)
    with timing.queue:
        clock.advance(5.0)
        assert timing.header(clock()) == b"queue;dur=5000.0, proxy;dur=2.0"


def test_timing_waits_add_up_when_entered_twice() -> None:
    clock = Clock()
    timing = RequestTiming(clock)
    for _ in range(2):
        with timing.upstream:
            clock.advance(0.25)
    assert timing.upstream.total_s == pytest.approx(0.5)
    assert timing.queue.total_s is None


def test_timing_wait_is_counted_when_it_ends_with_an_exception() -> None:
    clock = Clock()
    timing = RequestTiming(clock)

    def time_out() -> None:
        with timing.upstream:
            clock.advance(1.0)
            raise TimeoutError

    with pytest.raises(TimeoutError):
        time_out()
    assert timing.upstream.total_s == pytest.approx(1.0)


def test_timing_proxy_time_is_none_without_an_answer() -> None:
    timing = RequestTiming(Clock())
    assert timing.proxy_s() is None


def test_timing_proxy_time_excludes_the_waits() -> None:
    clock = Clock()
    timing = RequestTiming(clock)
    clock.advance(0.001)
    with timing.queue:
        clock.advance(3.0)
    with timing.upstream:
        clock.advance(1.0)
    clock.advance(0.002)
    timing.responded = clock()
    clock.advance(60.0)  # the stream goes on: not the proxy's time
    assert timing.proxy_s() == pytest.approx(0.003)


def test_timing_proxy_time_runs_to_the_last_wait_when_headers_went_out_early() -> None:
    clock = Clock()
    timing = RequestTiming(clock)
    clock.advance(0.001)
    with timing.queue:
        clock.advance(5.0)
        timing.responded = clock()  # the heartbeat opened the stream
        clock.advance(5.0)
    clock.advance(0.002)
    with timing.upstream:
        clock.advance(0.5)
    assert timing.proxy_s() == pytest.approx(0.003)


# -- the middleware ---------------------------------------------------------------------------


async def _call(app: Any, scope_type: str = "http") -> tuple[list[dict[str, Any]], Scope]:
    sent: list[dict[str, Any]] = []
    scope: Scope = {"type": scope_type, "method": "GET", "path": "/", "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await ServerTiming(app)(scope, receive, send)
    return sent, scope


SHARED_HEADERS = [(b"content-type", b"text/event-stream")]


async def _stream_app(scope: Scope, receive: Receive, send: Send) -> None:
    timing = request_timing(scope)
    assert timing is not None
    with timing.upstream:
        pass
    await send({"type": "http.response.start", "status": 200, "headers": SHARED_HEADERS})
    for chunk in (b"data: 1\n\n", b"data: [DONE]\n\n"):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_server_timing_is_added_to_the_headers_and_the_body_passes_as_sent() -> None:
    sent, _ = await _call(_stream_app)
    headers = dict(sent[0]["headers"])
    entries = headers[b"server-timing"].decode().split(", ")
    assert [entry.split(";")[0] for entry in entries] == ["upstream", "proxy"]
    assert all(ENTRY.match(entry) for entry in entries)
    assert headers[b"content-type"] == b"text/event-stream"
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", b"data: [DONE]\n\n", b""]


async def test_server_timing_leaves_the_response_own_header_list_alone() -> None:
    await _call(_stream_app)
    assert SHARED_HEADERS == [(b"content-type", b"text/event-stream")]


async def test_server_timing_stamps_when_the_headers_went_out() -> None:
    _, scope = await _call(_stream_app)
    timing = request_timing(scope)
    assert timing is not None
    assert timing.responded is not None
    assert timing.responded >= timing.started


async def test_server_timing_passes_other_scopes_untouched() -> None:
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    await _call(app, scope_type="lifespan")
    assert request_timing(seen[0]) is None


def test_server_timing_is_on_the_500_answering_an_unhandled_error(tmp_path: Path) -> None:
    # Starlette answers an unhandled exception outside every middleware of ours.
    settings = ProxySettings(log_path=tmp_path / "log.jsonl")  # built, not started
    app = create_app(settings, RegistrySettings(registry_dir=tmp_path))

    async def broken(_: Request) -> Response:
        raise RuntimeError("a bug")

    app.add_route("/broken", broken)
    response = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False).get(
        "/broken"
    )
    assert response.status_code == 500
    assert ENTRY.match(response.headers["server-timing"])


def test_server_timing_is_on_every_route_of_the_app(tmp_path: Path) -> None:
    settings = ProxySettings(log_path=tmp_path / "log.jsonl")
    app = create_app(settings, RegistrySettings(registry_dir=tmp_path))
    for path in ("/v1/openapi.json", "/v1/nothing"):
        response = TestClient(app, base_url="http://127.0.0.1").get(path)
        assert ENTRY.match(response.headers["server-timing"]), path
