"""Every request has one owner: whatever ends it (an answer, an error, a bug, the client leaving at
any step) it gets exactly one request-log line, the in-flight count comes back down, and the
upstream request ends with it. Streams are complete, or end with an error that says why."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import write_json
from support.fake_ollama import FakeOllama, dead_url
from support.proxy_server import ProxyServer
from support.scripted_upstream import SCENARIOS, ScriptedUpstream

pytestmark = pytest.mark.timeout(60)

HEARTBEAT_S = 0.5
# An autostart command for the `sleepy` entry: a server that never comes up, so the lease is
# never granted and the request waits "while the model loads" for as long as the client stays.
NEVER_UP = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(installed=["llava:7b"]) as server:
        yield server


@pytest.fixture
def proxy(tmp_path: Path, upstream: ScriptedUpstream, ollama: FakeOllama) -> Iterator[ProxyServer]:
    entries: list[dict[str, Any]] = [
        {
            "name": f"scripted_{scenario}",
            "display_name": f"scripted {scenario}",
            "backend": "external",
            "served_model_id": scenario,
            "backend_config": {"base_url": f"{upstream.url}/v1"},
        }
        for scenario in SCENARIOS
    ]
    entries += [
        {
            "name": "sleepy",
            "backend": "external",
            "served_model_id": "sleepy",
            "backend_config": {"base_url": f"{dead_url()}/v1"},
        },
        {  # --num-ctx: every request takes Ollama's native /api/chat
            "name": "llava",
            "backend": "ollama",
            "served_model_id": "llava:7b",
            "capabilities": {"vision": True, "tools": True},
            "backend_config": {"base_url": ollama.url, "extra_args": ["--num-ctx", "4096"]},
        },
    ]
    registry = tmp_path / "configs"
    write_json(registry / "model_registry.curated.json", entries)
    with ProxyServer(
        registry,
        tmp_path,
        include_non_installed=True,
        enable_metrics=True,
        stream_heartbeat_s=HEARTBEAT_S,
        autostart_enabled=True,
        autostart_map={"sleepy": NEVER_UP},
        autostart_grace_period_s=120,
    ) as server:
        yield server


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def read_log(proxy: ProxyServer) -> list[dict[str, Any]]:
    if not proxy.log_path.exists():
        return []
    return [json.loads(line) for line in proxy.log_path.read_text().splitlines()]


def log_once(proxy: ProxyServer, count: int = 1) -> list[dict[str, Any]]:
    """The request log once it holds `count` lines, and after a moment to show no more come."""
    deadline = time.monotonic() + 10
    while len(read_log(proxy)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    records = read_log(proxy)
    assert len(records) == count, records
    return records


def in_flight_settles(proxy: ProxyServer) -> int:
    """The proxy's in-flight count once it reaches 0 (or what it is after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        value = int(httpx.get(f"{proxy.url}/v1/metrics").json()["overall"]["in_flight"])
        if value == 0 or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def sse_data(lines: Iterator[str]) -> list[str]:
    return [line[5:].strip() for line in lines if line.startswith("data:")]


def assert_openai_error(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


# -- a field of the wrong type ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_a_wrong_stop_to_an_ollama_entry_is_a_400_logged_once_and_leaves_nothing_in_flight(
    proxy: ProxyServer, stream: bool
) -> None:
    # `stop` must be a string or a list; the native Ollama translation once tripped over a
    # number (a TypeError, 500). The typed request refuses it before anything else happens.
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions", json=chat("llava", stop=5, stream=stream), timeout=10
    )
    assert response.status_code == 400
    error = assert_openai_error(response.json())
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "stop",
        "invalid_type",
    )
    assert "expected a string or an array of strings" in error["message"]
    (record,) = log_once(proxy)
    assert (record["outcome"], record["status"]) == ("error", 400)
    assert record["model_requested"] is None  # refused before anything was read from it
    assert in_flight_settles(proxy) == 0


# -- streams that end without a finish_reason ---------------------------------------------------


@pytest.mark.parametrize("scenario", ["cut-short", "early-done"])
def test_a_stream_ending_without_finish_reason_says_it_was_truncated(
    proxy: ProxyServer, scenario: str
) -> None:
    with httpx.stream(
        "POST",
        f"{proxy.url}/v1/chat/completions",
        json=chat(f"scripted {scenario}", stream=True),
        timeout=10,
    ) as response:
        assert response.status_code == 200
        data = sse_data(response.iter_lines())
    assert json.loads(data[1])["choices"][0]["delta"]["content"] == "Hello"
    assert data[-1] == "[DONE]"
    error = assert_openai_error(json.loads(data[-2]))
    assert (error["type"], error["code"]) == ("backend_error", "stream_truncated")
    assert len(data) == 4  # role, content, the error, [DONE]
    (record,) = log_once(proxy)
    assert (record["outcome"], record["status"]) == ("error", 502)
    assert in_flight_settles(proxy) == 0


def test_a_complete_stream_is_ok(proxy: ProxyServer) -> None:
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=chat("scripted echo", stream=True)
    ) as response:
        data = sse_data(response.iter_lines())
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["choices"][0]["finish_reason"] == "stop"
    (record,) = log_once(proxy)
    assert (record["outcome"], record["status"]) == ("ok", 200)


# -- the client leaving, at every step ----------------------------------------------------------


def test_a_client_leaving_while_the_model_loads_after_heartbeats_is_cancelled(
    proxy: ProxyServer,
) -> None:
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=chat("sleepy", stream=True), timeout=10
    ) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line)
        assert first.startswith(": loading sleepy")
    (record,) = log_once(proxy)
    assert (record["outcome"], record["status"]) == ("cancelled", 499)
    assert in_flight_settles(proxy) == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_leaving_while_the_model_loads_before_any_byte_is_cancelled(
    proxy: ProxyServer, stream: bool
) -> None:
    with pytest.raises(httpx.ReadTimeout):  # gives up before the first heartbeat
        httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json=chat("sleepy", stream=stream),
            timeout=HEARTBEAT_S / 3,
        )
    (record,) = log_once(proxy)
    assert (record["outcome"], record["status"]) == ("cancelled", 499)
    assert record["stream"] is stream
    assert in_flight_settles(proxy) == 0


def test_a_client_leaving_after_the_headers_before_the_first_event_cancels_upstream(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    before = upstream.disconnects
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=chat("scripted mute", stream=True)
    ) as response:
        assert response.status_code == 200  # and gone before any event
    assert upstream.wait_for_disconnect(timeout=10, count=before + 1)
    (record,) = log_once(proxy)
    assert (record["outcome"], record["status"]) == ("cancelled", 499)
    assert in_flight_settles(proxy) == 0


def test_a_client_leaving_mid_stream_cancels_upstream(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    before = upstream.disconnects
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=chat("scripted hang", stream=True)
    ) as response:
        next(line for line in response.iter_lines() if line.startswith("data:"))
    assert upstream.wait_for_disconnect(timeout=10, count=before + 1)
    (record,) = log_once(proxy)
    assert (record["outcome"], record["status"]) == ("cancelled", 499)
    assert in_flight_settles(proxy) == 0


def test_a_client_leaving_right_after_done_got_a_complete_answer(proxy: ProxyServer) -> None:
    host, port = proxy.url.removeprefix("http://").split(":")
    body = json.dumps(chat("scripted echo", stream=True)).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while b"data: [DONE]" not in received:  # and hang up the moment it is there
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    (record,) = log_once(proxy)
    assert (record["outcome"], record["status"]) == ("ok", 200)
    assert in_flight_settles(proxy) == 0


def test_a_client_leaving_a_non_stream_request_cancels_upstream(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    before = upstream.disconnects
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted hang"), timeout=0.5)
    assert upstream.wait_for_disconnect(timeout=10, count=before + 1)
    (record,) = log_once(proxy)
    assert (record["outcome"], record["status"]) == ("cancelled", 499)
    assert in_flight_settles(proxy) == 0


# -- many at once -------------------------------------------------------------------------------


def _answered(url: str, model: str, stream: bool) -> None:
    if not stream:
        httpx.post(url, json=chat(model), timeout=10).raise_for_status()
        return
    with httpx.stream("POST", url, json=chat(model, stream=True), timeout=10) as response:
        response.read()


def _abandoned(url: str, model: str, stream: bool) -> None:
    if not stream:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=chat(model), timeout=0.5)
        return
    with httpx.stream("POST", url, json=chat(model, stream=True), timeout=10) as response:
        next(line for line in response.iter_lines() if line)


def _left_after_headers(url: str, model: str, stream: bool) -> None:
    with httpx.stream("POST", url, json=chat(model, stream=stream), timeout=10) as response:
        assert response.status_code == 200


def test_many_concurrent_requests_each_get_one_log_line_and_in_flight_returns_to_zero(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    url = f"{proxy.url}/v1/chat/completions"
    plan: list[tuple[Any, str, bool, str]] = [
        (_answered, "scripted echo", False, "ok"),
        (_answered, "scripted echo", True, "ok"),
        (_answered, "scripted trickle", True, "ok"),
        (_abandoned, "scripted hang", False, "cancelled"),
        (_abandoned, "scripted hang", True, "cancelled"),
        (_left_after_headers, "scripted mute", True, "cancelled"),
        (_answered, "scripted cut-short", True, "error"),
        (_answered, "scripted error-500", True, "error"),
    ]
    jobs = [plan[i % len(plan)] for i in range(20)]
    before = upstream.disconnects
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        clients = [pool.submit(client, url, model, stream) for client, model, stream, _ in jobs]
        for finished in clients:
            finished.result(timeout=30)  # a client's failed assertion fails the test
    records = log_once(proxy, len(jobs))
    assert len({record["request_id"] for record in records}) == len(jobs)
    outcomes = sorted(record["outcome"] for record in records)
    assert outcomes == sorted(job[3] for job in jobs)
    assert in_flight_settles(proxy) == 0
    abandoned = sum(job[3] == "cancelled" for job in jobs)
    assert upstream.wait_for_disconnect(timeout=10, count=before + abandoned)
