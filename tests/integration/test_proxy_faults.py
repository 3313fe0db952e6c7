"""The proxy in front of a scripted upstream: pass-through, timeouts, disconnects, errors."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import write_json
from support.proxy_server import ProxyServer
from support.scripted_upstream import CONTEXT_ERROR, ROLE_DELTA, SCENARIOS, ScriptedUpstream

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


@pytest.fixture
def registry(tmp_path: Path, upstream: ScriptedUpstream) -> Path:
    """One `external` entry per scripted scenario, named `scripted <scenario>`."""
    directory = tmp_path / "configs"
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
    entries.append(
        {
            "name": "down",
            "backend": "external",
            "served_model_id": "down",
            "backend_config": {"base_url": _dead_url()},
        }
    )
    write_json(directory / "model_registry.curated.json", entries)
    return directory


@pytest.fixture
def proxy(registry: Path, tmp_path: Path) -> Iterator[ProxyServer]:
    with ProxyServer(
        registry, tmp_path, include_non_installed=True, stream_idle_timeout_ms=1500
    ) as server:
        yield server


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def log_lines(proxy: ProxyServer) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:  # the writer thread appends shortly after the response
        if proxy.log_path.exists():
            lines = [json.loads(line) for line in proxy.log_path.read_text().splitlines()]
            if lines:
                return lines
        if time.monotonic() > deadline:
            return []
        time.sleep(0.02)


def assert_openai_error(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return dict(body["error"])


def test_non_stream_returns_backend_json_with_model_rewritten(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted echo"))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == 12
    assert upstream.requests[-1]["model"] == "echo"  # the backend's served id
    assert "authorization" not in upstream.headers[-1]


def test_stream_passes_every_chunk_through_unchanged(proxy: ProxyServer) -> None:
    request = chat("scripted echo", stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = list(sse_data(response.iter_lines()))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == [
        "Hello",
        " from",
        " upstream",
    ]
    assert chunks[4]["choices"][0]["finish_reason"] == "stop"
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"]["total_tokens"] == 12


def test_stream_delivers_each_event_before_the_backend_sends_the_next(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    with httpx.stream(
        "POST",
        f"{proxy.url}/v1/chat/completions",
        json=chat("scripted gated", stream=True),
        timeout=10,
    ) as response:
        events = sse_data(response.iter_lines())
        first = json.loads(next(events))
        second = json.loads(next(events))
        # The upstream holds chunk 3 until released: we saw chunks 1-2 without it.
        assert first["choices"][0]["delta"]["role"] == "assistant"
        assert second["choices"][0]["delta"]["content"] == "Hello"
        upstream.release("gate")
        rest = list(events)
    assert rest[-1] == "[DONE]"


def test_stream_idle_timeout_ends_with_error_event(proxy: ProxyServer) -> None:
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=chat("scripted hang", stream=True)
    ) as response:
        assert response.status_code == 200
        data = list(sse_data(response.iter_lines()))
    assert data[-1] == "[DONE]"
    error = assert_openai_error(json.loads(data[-2]))
    assert error["code"] == "stream_idle_timeout"
    record = log_lines(proxy)[-1]
    assert record["outcome"] == "error"
    assert record["stream"] is True


def test_client_disconnect_mid_stream_cancels_upstream(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    before = upstream.disconnects
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=chat("scripted hang", stream=True)
    ) as response:
        next(sse_data(response.iter_lines()))
    # the client is gone: the upstream request must be abandoned too
    assert upstream.wait_for_disconnect(timeout=10, count=before + 1)
    record = log_lines(proxy)[-1]
    assert record["outcome"] == "cancelled"


def test_client_disconnect_during_non_stream_cancels_upstream(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    before = upstream.disconnects
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted hang"), timeout=0.5)
    assert upstream.wait_for_disconnect(timeout=10, count=before + 1)
    outcomes = [r["outcome"] for r in log_lines(proxy)]
    deadline = time.monotonic() + 10
    while "cancelled" not in outcomes and time.monotonic() < deadline:
        time.sleep(0.05)
        outcomes = [r["outcome"] for r in log_lines(proxy)]
    assert "cancelled" in outcomes


def test_backend_4xx_passes_through_with_status_and_message(proxy: ProxyServer) -> None:
    for stream in (False, True):
        response = httpx.post(
            f"{proxy.url}/v1/chat/completions", json=chat("scripted error-400", stream=stream)
        )
        assert response.status_code == 400
        assert response.json() == CONTEXT_ERROR


def test_backend_5xx_becomes_502_quoting_the_backend(proxy: ProxyServer) -> None:
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted error-500"))
    assert response.status_code == 502
    error = assert_openai_error(response.json())
    assert "internal upstream failure" in error["message"]
    html = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted error-html"))
    assert html.status_code == 502
    assert_openai_error(html.json())


def test_backend_down_is_503_naming_the_backend(proxy: ProxyServer) -> None:
    for stream in (False, True):
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("down", stream=stream))
        assert response.status_code == 503
        error = assert_openai_error(response.json())
        assert "external:down" in error["message"]
        assert error["code"] == "backend_unreachable"


def test_mid_stream_crash_becomes_error_event_then_done(proxy: ProxyServer) -> None:
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=chat("scripted crash", stream=True)
    ) as response:
        data = list(sse_data(response.iter_lines()))
    # What the backend sent before it broke arrives whole, as far as it arrives: aiohttp drops
    # what it read together with the broken end (here the same read), never part of an event.
    deltas = [json.loads(event)["choices"][0]["delta"] for event in data[:-2]]
    assert deltas == [ROLE_DELTA, {"content": "Hello"}][: len(deltas)]
    error = assert_openai_error(json.loads(data[-2]))
    assert error["code"] == "upstream_disconnected"
    assert data[-1] == "[DONE]"


def test_non_json_backend_body_is_502(proxy: ProxyServer) -> None:
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted crash"))
    assert response.status_code == 502
    assert assert_openai_error(response.json())["code"] == "bad_upstream_response"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
        (json.dumps({"model": "scripted echo"}).encode(), "messages"),
        (json.dumps({"model": "scripted echo", "messages": ["hi"]}).encode(), "messages[0]"),
        (json.dumps(chat("scripted echo", stream="yes")).encode(), "stream"),
    ],
)
def test_invalid_requests_are_400(proxy: ProxyServer, body: bytes, param: str | None) -> None:
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert assert_openai_error(response.json())["param"] == param


def test_unknown_model_is_404_listing_close_matches(proxy: ProxyServer) -> None:
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted ech"))
    assert response.status_code == 404
    error = assert_openai_error(response.json())
    assert error["code"] == "model_not_found"
    assert "scripted echo" in error["message"]


def test_unknown_route_and_disabled_metrics_are_openai_404(proxy: ProxyServer) -> None:
    for path in ("/v1/nothing", "/v1/metrics", "/metrics"):
        response = httpx.get(f"{proxy.url}{path}")
        assert response.status_code == 404
        assert_openai_error(response.json())


def test_log_lines_for_success_and_error_never_hold_secrets(proxy: ProxyServer) -> None:
    httpx.post(
        f"{proxy.url}/v1/chat/completions",
        json=chat("scripted echo"),
        headers={"Authorization": "Bearer sk-secret"},
    )
    httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted error-400"))
    records = log_lines(proxy)
    deadline = time.monotonic() + 10
    while len(records) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
        records = log_lines(proxy)
    ok, error = records[-2], records[-1]
    assert ok["outcome"] == "ok"
    assert ok["status"] == 200
    assert ok["model_requested"] == "scripted echo"
    assert ok["model_resolved"] == "scripted_echo"
    assert ok["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert ok["latency_ms"] > 0
    assert "prompt" not in ok  # prompts are opt-in
    assert error["outcome"] == "error"
    assert error["status"] == 400
    assert "sk-secret" not in proxy.log_path.read_text()


def test_metrics_when_enabled(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path, include_non_installed=True, enable_metrics=True) as proxy:
        httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted echo"))
        httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted error-400"))
        metrics = httpx.get(f"{proxy.url}/v1/metrics").json()
    overall = metrics["overall"]
    assert overall["requests"] == 2
    assert overall["errors"] == 1
    assert overall["in_flight"] == 0
    assert set(overall["latency_ms"]) == {"p50", "p95", "p99"}
    assert set(overall["ttft_ms"]) == {"p50", "p95"}
    assert "tokens_per_s" in overall
    assert set(metrics["models"]) == {"scripted_echo", "scripted_error-400"}
    assert "last_swap" in metrics


def test_backend_timeout_bounds_a_non_stream_answer(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path, backend_timeout_ms=300) as proxy:
        response = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted slow"))
    assert response.status_code == 504
    assert assert_openai_error(response.json())["code"] == "backend_timeout"


def test_unwritable_log_path_is_reported_once_and_requests_keep_working(
    registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()  # a directory where the log file should be
    with ProxyServer(registry, tmp_path, log_path=blocked, include_non_installed=True) as proxy:
        for _ in range(3):
            response = httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted echo"))
            assert response.status_code == 200
    warnings = [r for r in caplog.records if "cannot write request log" in r.getMessage()]
    assert len(warnings) == 1
    assert str(blocked) in warnings[0].getMessage()


def test_log_prompts_records_prompt_and_response(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path, include_non_installed=True, log_prompts=True) as proxy:
        httpx.post(f"{proxy.url}/v1/chat/completions", json=chat("scripted echo"))
        with httpx.stream(
            "POST", f"{proxy.url}/v1/chat/completions", json=chat("scripted echo", stream=True)
        ) as response:
            response.read()
        deadline = time.monotonic() + 10
        records = log_lines(proxy)
        while len(records) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
            records = log_lines(proxy)
    whole, streamed = records[-2], records[-1]
    assert whole["prompt"] == [{"role": "user", "content": "hi"}]
    assert "Hello from the scripted upstream." in json.dumps(whole["response"])
    assert streamed["prompt"] == [{"role": "user", "content": "hi"}]
    assert streamed["response"] == "Hello from upstream"
