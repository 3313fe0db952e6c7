"""Answers in the shape OpenAI sends, whatever the backend leaves out: the proxy in front of the
scripted upstream, whose answers have no `refusal`, no `logprobs` and name its own model id."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import write_json
from support.proxy_server import ProxyServer
from support.scripted_upstream import ScriptedUpstream

pytestmark = pytest.mark.timeout(60)

REQUESTED = "echo (scripted)"
ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture
def registry(tmp_path: Path, upstream: ScriptedUpstream) -> Path:
    directory = tmp_path / "configs"
    write_json(
        directory / "model_registry.curated.json",
        [
            {
                "name": "scripted_echo",
                "display_name": REQUESTED,
                "backend": "external",
                "served_model_id": "echo",
                "backend_config": {"base_url": f"{upstream.url}/v1"},
            }
        ],
    )
    return directory


def complete(proxy: ProxyServer, **extra: Any) -> dict[str, Any]:
    payload = {"model": REQUESTED, "messages": ASK, **extra}
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=payload, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def stream(proxy: ProxyServer, **extra: Any) -> list[dict[str, Any]]:
    payload = {"model": REQUESTED, "messages": ASK, "stream": True, **extra}
    url = f"{proxy.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=payload, timeout=30) as response:
        assert response.status_code == 200
        data = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


def test_answer_has_null_refusal_and_logprobs(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path) as proxy:
        choice = complete(proxy)["choices"][0]
    assert "logprobs" in choice
    assert choice["logprobs"] is None
    assert "refusal" in choice["message"]
    assert choice["message"]["refusal"] is None


def test_answer_names_the_requested_model(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path) as proxy:
        assert complete(proxy)["model"] == REQUESTED


def test_stream_chunks_name_the_requested_model(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path) as proxy:
        chunks = stream(proxy)
    assert len(chunks) >= 3
    assert {chunk["model"] for chunk in chunks} == {REQUESTED}


def test_response_model_backend_keeps_the_served_id(registry: Path, tmp_path: Path) -> None:
    with ProxyServer(registry, tmp_path, response_model="backend") as proxy:
        assert complete(proxy)["model"] == "echo"
        assert {chunk["model"] for chunk in stream(proxy)} == {"echo"}
