"""Malformed requests through the real proxy, in front of the demo backend (the real console
script and llama.cpp) and of the scripted upstream: each is a 400 that names the field, a body
nested too deep is a 400, a body too large is a 413 before it is read, and what a backend
rejects as bad input reaches the client as a 400, not a 502. Unknown fields reach the backend
untouched."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import make_demo_workspace, write_json
from support.llama_cpp_python import serve_with_llama_cpp_python
from support.proxy_process import RunningProxy, Workspace
from support.proxy_server import ProxyServer
from support.scripted_upstream import SCENARIOS, ScriptedUpstream

pytestmark = pytest.mark.timeout(180)

SMOL = "smollm2 135m (Q4 1)"


@dataclass(frozen=True)
class Proxy:
    url: str
    model: str  # a model it serves


@contextlib.contextmanager
def _demo_proxy(workspace: Workspace, demo_models: Path) -> Iterator[RunningProxy]:
    make_demo_workspace(workspace.root, demo_models)
    with workspace.serving() as running:
        yield running


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Proxy]:
    """The demo registry behind the real console script, llama-server serving its models."""
    with _demo_proxy(Workspace(tmp_path_factory.mktemp("demo")), demo_models) as running:
        yield Proxy(running.url, SMOL)


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def scripted_proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream: ScriptedUpstream
) -> Iterator[ProxyServer]:
    root = tmp_path_factory.mktemp("scripted")
    entries = [
        {
            "name": f"scripted_{scenario}",
            "display_name": f"scripted {scenario}",
            "backend": "external",
            "served_model_id": scenario,
            "backend_config": {"base_url": f"{upstream.url}/v1"},
        }
        for scenario in SCENARIOS
    ]
    write_json(root / "configs" / "model_registry.curated.json", entries)
    with ProxyServer(root / "configs", root, include_non_installed=True) as server:
        yield server


@pytest.fixture(scope="module")
def scripted(scripted_proxy: ProxyServer) -> Proxy:
    return Proxy(scripted_proxy.url, "scripted echo")


@pytest.fixture(params=["demo", "scripted"])
def proxy(request: pytest.FixtureRequest) -> Proxy:
    found: Proxy = request.getfixturevalue(request.param)
    return found


def post(proxy: Proxy, body: bytes | dict[str, Any]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{proxy.url}/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )


def openai_error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# -- the table of issue 10: each a 400 naming the field ------------------------------------------

WRONG_FIELDS = {
    "role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    "content": ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    "stop": ({"stop": 5}, "stop"),
    "max_tokens": ({"max_tokens": "abc"}, "max_tokens"),
    "temperature": ({"temperature": "hot"}, "temperature"),
}


@pytest.mark.parametrize(("fields", "param"), WRONG_FIELDS.values(), ids=WRONG_FIELDS.keys())
def test_a_field_of_the_wrong_type_or_value_is_a_400_naming_it(
    proxy: Proxy, fields: dict[str, Any], param: str
) -> None:
    body = {"model": proxy.model, "messages": [{"role": "user", "content": "hi"}], **fields}
    response = post(proxy, body)
    assert response.status_code == 400
    error = openai_error(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert f"'{param}': expected " in error["message"]


def test_a_body_nested_5000_deep_is_a_400(proxy: Proxy) -> None:
    nested = b"[" * 5000 + b"]" * 5000
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "x": %s}'
    response = post(proxy, body % (proxy.model.encode(), nested))
    assert response.status_code == 400
    error = openai_error(response)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_json")
    assert "nested deeper than 64 levels" in error["message"]


def test_the_proxy_still_answers_after_the_refusals(proxy: Proxy) -> None:
    body = {"model": proxy.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    response = post(proxy, body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


# -- what the backend sees --------------------------------------------------------------------


def test_unknown_fields_reach_the_backend_untouched(
    scripted: Proxy, upstream: ScriptedUpstream
) -> None:
    body: dict[str, Any] = {
        "model": "scripted echo",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi é 🐍"}], "x_part": [1]}
        ],
        "temperature": 1,
        "top_k": 40,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "chat_template_kwargs": {"enable_thinking": False},
        "stream_options": None,
        "nested": {"deep": [{"a": None}, 2.5, "x"]},
    }
    before = len(upstream.requests)
    assert post(scripted, body).status_code == 200
    assert upstream.requests[before:] == [{**body, "model": "echo"}]


def test_a_backend_500_of_its_own_stays_a_502(scripted: Proxy) -> None:
    body = {"model": "scripted error-500", "messages": [{"role": "user", "content": "hi"}]}
    response = post(scripted, body)
    assert response.status_code == 502
    assert openai_error(response)["code"] == "upstream_error"


def test_a_backend_500_blaming_the_request_is_a_400(scripted: Proxy) -> None:
    body = {"model": "scripted error-validation", "messages": [{"role": "user", "content": "hi"}]}
    response = post(scripted, body)
    assert response.status_code == 400
    error = openai_error(response)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "top_k",
        "backend_rejected_request",
    )
    assert "Input should be a valid integer" in error["message"]


@pytest.fixture(scope="module")
def llama_cpp_python(
    tmp_path_factory: pytest.TempPathFactory, demo_models: Path
) -> Iterator[Proxy]:
    """The demo registry served by llama-cpp-python's server (else its stand-in), which answers
    input its models reject with a 500 and a validation dump."""
    workspace = serve_with_llama_cpp_python(Workspace(tmp_path_factory.mktemp("llama-cpp-python")))
    with _demo_proxy(workspace, demo_models) as running:
        yield Proxy(running.url, SMOL)


@pytest.mark.parametrize(("field", "value"), [("top_k", "abc"), ("min_p", "low")])
def test_an_extension_the_backend_rejects_is_a_400_naming_it(
    llama_cpp_python: Proxy, field: str, value: str
) -> None:
    # Extensions are the backend's to judge: the proxy forwards them, and llama-cpp-python's
    # 500 for them is the client's 400.
    body = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], field: value}
    response = post(llama_cpp_python, body)
    assert response.status_code == 400
    error = openai_error(response)
    assert (error["param"], error["code"]) == (field, "backend_rejected_request")
    assert "valid" in error["message"]
    assert "File " not in error["message"]


@pytest.mark.parametrize(("field", "value"), [("top_k", "abc"), ("min_p", "low")])
def test_an_extension_llama_server_rejects_is_a_400(demo: Proxy, field: str, value: str) -> None:
    body = {"model": SMOL, "messages": [{"role": "user", "content": "hi"}], field: value}
    response = post(demo, body)
    assert response.status_code == 400
    assert field in openai_error(response)["message"]


# -- CHAT_PROXY_MAX_BODY_BYTES: a 413 before the body is read --------------------------------

SIXTY_MB = 60_000_000
PIECE = 1 << 20


def _send_until_answered(
    proxy: Proxy, head: bytes, frames: Iterator[bytes], timeout_s: float = 60
) -> tuple[bytes, int, bool]:
    """Write `head` then `frames` over a raw socket while reading what comes back; stop
    writing as soon as an answer arrives. Returns (what was received, body bytes written,
    whether the proxy closed the connection)."""
    host, port = proxy.url.removeprefix("http://").split(":")
    received = b""
    written = 0
    closed = False
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        pending = b""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not pending:
                pending = next(frames, b"")
            writable = [sock] if pending and not received else []
            readable, ready, _ = select.select([sock], writable, [], 1.0)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    closed = True
                    break
                if not data:
                    closed = True
                    break
                received += data
            elif ready:
                try:
                    sent = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                written += sent
                pending = pending[sent:]
    return received, written, closed


def _chunked(total: int) -> Iterator[bytes]:
    """A JSON-looking body of `total` bytes, in chunked transfer encoding."""
    start = b'{"model": "m", "messages": [{"role": "user", "content": "'
    yield b"%x\r\n%s\r\n" % (len(start), start)
    for _ in range((total - len(start)) // PIECE):
        yield b"%x\r\n%s\r\n" % (PIECE, b"a" * PIECE)


def test_a_60mb_body_is_a_413_before_it_is_read_and_the_connection_closes(proxy: Proxy) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    began = time.monotonic()
    received, written, closed = _send_until_answered(proxy, head, _chunked(SIXTY_MB))
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert written < SIXTY_MB  # answered while the client was still sending
    assert closed  # and the rest never read
    headers, _, content = received.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    error = json.loads(content)["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "body_too_large")
    assert "CHAT_PROXY_MAX_BODY_BYTES" in error["message"]
    assert time.monotonic() - began < 30


def test_a_content_length_over_the_limit_is_a_413_before_any_byte_is_read(proxy: Proxy) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % SIXTY_MB
    )
    received, written, closed = _send_until_answered(proxy, head, iter([]), timeout_s=10)
    assert received.startswith(b"HTTP/1.1 413 "), received[:200]
    assert written == 0
    assert closed


def _log_lines(proxy: ProxyServer) -> list[dict[str, Any]]:
    text = proxy.log_path.read_text() if proxy.log_path.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def test_a_refused_body_is_logged_once(tmp_path: Path, upstream: ScriptedUpstream) -> None:
    entry = {"name": "echo", "backend": "external", "served_model_id": "echo"}
    entry["backend_config"] = {"base_url": f"{upstream.url}/v1"}
    write_json(tmp_path / "configs" / "model_registry.curated.json", [entry])
    with ProxyServer(tmp_path / "configs", tmp_path, max_body_bytes=1_000) as proxy:
        response = httpx.post(f"{proxy.url}/v1/chat/completions", content=b"x" * 1_001, timeout=10)
        assert response.status_code == 413
        deadline = time.monotonic() + 10
        while not _log_lines(proxy) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # and no second line
        (record,) = _log_lines(proxy)
    assert (record["status"], record["outcome"], record["model_requested"]) == (413, "error", None)
    assert "CHAT_PROXY_MAX_BODY_BYTES" in record["error"]
