"""The fake Ollama does what the proxy's Ollama-coordination tests rely on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support.fake_ollama import REPLY_PIECES, REPLY_TEXT, VERSION, FakeOllama, dead_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]

QWEN = "qwen3:8b"
LLAVA = "llava:7b"
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(installed=[QWEN, LLAVA]) as server:
        yield server


@pytest.fixture
def client(ollama: FakeOllama) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ollama.url, timeout=5.0) as http:
        yield http


def chat(model: str = QWEN, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def ps_names(client: httpx.Client) -> list[str]:
    return [model["name"] for model in client.get("/api/ps").json()["models"]]


def test_version_and_root(client: httpx.Client) -> None:
    assert client.get("/api/version").json() == {"version": VERSION}
    assert client.get("/").text == "Ollama is running"
    assert client.get("/api/nope").status_code == 404


def test_tags_lists_installed_and_ps_lists_loaded(ollama: FakeOllama, client: httpx.Client) -> None:
    tags = client.get("/api/tags").json()["models"]
    assert [(m["name"], m["model"]) for m in tags] == [(QWEN, QWEN), (LLAVA, LLAVA)]
    assert {"modified_at", "size", "digest", "details"} <= tags[0].keys()
    assert client.get("/api/ps").json() == {"models": []}
    assert ollama.loaded == set()

    ollama.load(LLAVA)
    [loaded] = client.get("/api/ps").json()["models"]
    assert (loaded["name"], loaded["model"]) == (LLAVA, LLAVA)
    assert loaded["size_vram"] == loaded["size"] > 0
    assert loaded["expires_at"].endswith("Z")
    assert ollama.loaded == {LLAVA}


def test_chat_non_stream_loads_the_model(ollama: FakeOllama, client: httpx.Client) -> None:
    response = client.post("/api/chat", json=chat(stream=False, options={"temperature": 0}))
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == QWEN
    assert body["message"] == {"role": "assistant", "content": REPLY_TEXT}
    assert (body["done"], body["done_reason"]) == (True, "stop")
    assert (body["prompt_eval_count"], body["eval_count"]) == (5, 7)
    assert "created_at" in body
    assert "total_duration" in body
    assert ps_names(client) == [QWEN]
    assert ollama.loaded == {QWEN}
    assert ollama.chat_requests == [chat(stream=False, options={"temperature": 0})]


def test_chat_streams_ndjson_by_default(ollama: FakeOllama, client: httpx.Client) -> None:
    with client.stream("POST", "/api/chat", json=chat()) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    *pieces, final = lines
    assert [p["message"] for p in pieces] == [
        {"role": "assistant", "content": piece} for piece in REPLY_PIECES
    ]
    assert all(p["done"] is False and p["model"] == QWEN for p in pieces)
    assert final["message"] == {"role": "assistant", "content": ""}
    assert (final["done"], final["done_reason"]) == (True, "stop")
    assert (final["prompt_eval_count"], final["eval_count"]) == (5, 7)
    assert ollama.loaded == {QWEN}


def test_generate_keep_alive_zero_unloads_immediately(
    ollama: FakeOllama, client: httpx.Client
) -> None:
    ollama.load(QWEN)
    ollama.load(LLAVA)
    body = client.post("/api/generate", json={"model": QWEN, "keep_alive": 0}).json()
    assert body["model"] == QWEN
    assert (body["response"], body["done"], body["done_reason"]) == ("", True, "unload")
    assert ps_names(client) == [LLAVA]
    assert ollama.loaded == {LLAVA}
    assert ollama.unload_requests == [QWEN]


def test_unload_with_delay_stays_in_ps_until_the_delay_passes(
    ollama: FakeOllama, client: httpx.Client
) -> None:
    ollama.set_unload_delay(0.5)
    ollama.load(QWEN)
    started = time.monotonic()
    response = client.post("/api/generate", json={"model": QWEN, "prompt": "", "keep_alive": "0s"})
    assert response.json()["done_reason"] == "unload"
    assert ps_names(client) == [QWEN]
    assert ollama.loaded == {QWEN}
    while ps_names(client):
        assert time.monotonic() - started < 5, "model never left /api/ps"
        time.sleep(0.02)
    assert time.monotonic() - started >= 0.5
    assert ollama.loaded == set()


def test_chat_unload_forms(ollama: FakeOllama, client: httpx.Client) -> None:
    ollama.load(QWEN)
    body = client.post("/api/chat", json={"model": QWEN, "messages": [], "keep_alive": 0}).json()
    assert body["message"] == {"role": "assistant", "content": ""}
    assert body["done_reason"] == "unload"
    assert ollama.loaded == set()
    # With messages and keep_alive 0 Ollama answers, then unloads.
    answer = client.post("/api/chat", json=chat(LLAVA, stream=False, keep_alive=0)).json()
    assert answer["message"]["content"] == REPLY_TEXT
    assert ollama.loaded == set()
    assert ollama.unload_requests == [QWEN, LLAVA]


def test_generate_with_prompt_loads_and_answers(ollama: FakeOllama, client: httpx.Client) -> None:
    body = client.post("/api/generate", json={"model": QWEN, "prompt": "hi", "stream": False})
    assert body.json()["response"] == REPLY_TEXT
    assert ollama.loaded == {QWEN}


def test_tool_call_has_object_arguments(ollama: FakeOllama, client: httpx.Client) -> None:
    request = chat(stream=False, tools=[WEATHER_TOOL])
    message = client.post("/api/chat", json=request).json()["message"]
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert message == {"role": "assistant", "content": "", "tool_calls": [call]}

    with client.stream("POST", "/api/chat", json=chat(tools=[WEATHER_TOOL])) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert lines[0]["message"]["tool_calls"] == [call]
    assert lines[0]["done"] is False
    assert (lines[-1]["done"], lines[-1]["done_reason"]) == (True, "stop")


def test_images_are_recorded(ollama: FakeOllama, client: httpx.Client) -> None:
    message = {"role": "user", "content": "what is this?", "images": ["aGVsbG8=", "d29ybGQ="]}
    request = {"model": LLAVA, "messages": [message], "stream": False}
    assert client.post("/api/chat", json=request).status_code == 200
    assert ollama.images == ["aGVsbG8=", "d29ybGQ="]
    assert ollama.chat_requests[0]["messages"][0]["images"] == ["aGVsbG8=", "d29ybGQ="]
    assert ollama.loaded == {LLAVA}


def test_unknown_model_is_404(ollama: FakeOllama, client: httpx.Client) -> None:
    response = client.post("/api/chat", json=chat("nope:1b", stream=False))
    assert response.status_code == 404
    assert response.json() == {"error": "model 'nope:1b' not found"}
    generate = client.post("/api/generate", json={"model": "nope:1b", "keep_alive": 0})
    assert generate.status_code == 404
    openai = client.post("/v1/chat/completions", json=chat("nope:1b"))
    assert openai.status_code == 404
    assert openai.json()["error"]["message"] == "model 'nope:1b' not found"
    assert client.post("/api/chat", json={"messages": []}).status_code == 400
    assert ollama.loaded == set()


def test_untagged_name_means_latest(client: httpx.Client) -> None:
    with FakeOllama(installed=["phi4"]) as other:
        assert httpx.get(other.url + "/api/tags").json()["models"][0]["name"] == "phi4:latest"
        response = httpx.post(other.url + "/api/chat", json=chat("phi4", stream=False))
        assert response.json()["model"] == "phi4"
        assert other.loaded == {"phi4:latest"}


def test_openai_chat_non_stream(ollama: FakeOllama, client: httpx.Client) -> None:
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [QWEN, LLAVA]
    body = client.post("/v1/chat/completions", json=chat()).json()
    assert body["object"] == "chat.completion"
    assert body["model"] == QWEN
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": REPLY_TEXT},
            "finish_reason": "stop",
        }
    ]
    assert body["usage"]["total_tokens"] == 12
    assert ollama.loaded == {QWEN}

    tool = client.post("/v1/chat/completions", json=chat(tools=[WEATHER_TOOL])).json()
    [call] = tool["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert tool["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_chat_stream(ollama: FakeOllama, client: httpx.Client) -> None:
    request = chat(LLAVA, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == REPLY_TEXT
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == 12
    assert ollama.loaded == {LLAVA}
    assert ollama.chat_requests == [request]


def test_calls_and_unload_requests_are_recorded_in_order(
    ollama: FakeOllama, client: httpx.Client
) -> None:
    client.get("/api/ps")
    client.post("/api/generate", json={"model": LLAVA, "keep_alive": 0})
    client.post("/api/generate", json={"model": QWEN, "keep_alive": 0})
    client.post("/api/chat", json=chat(stream=False))
    assert ollama.calls == [
        ("GET", "/api/ps", None),
        ("POST", "/api/generate", {"model": LLAVA, "keep_alive": 0}),
        ("POST", "/api/generate", {"model": QWEN, "keep_alive": 0}),
        ("POST", "/api/chat", chat(stream=False)),
    ]
    assert ollama.unload_requests == [LLAVA, QWEN]
    assert ollama.chat_requests == [chat(stream=False)]


def test_stop_answering_makes_requests_hang_until_close() -> None:
    ollama = FakeOllama().__enter__()
    try:
        ollama.stop_answering()
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(ollama.url + "/api/ps", timeout=0.3)
        assert ollama.calls == [("GET", "/api/ps", None)]
    finally:
        started = time.monotonic()
        ollama.close()
    assert time.monotonic() - started < 3


def test_close_then_a_second_instance_and_a_dead_port() -> None:
    with FakeOllama() as first:
        first.load(QWEN)
        port = int(first.url.rsplit(":", 1)[1])
    with pytest.raises(httpx.ConnectError):
        httpx.get(first.url + "/api/version", timeout=2)
    with FakeOllama(port=port) as second:  # same port, fresh state
        assert second.url == first.url
        assert httpx.get(second.url + "/api/ps").json() == {"models": []}
    with pytest.raises(httpx.ConnectError):
        httpx.get(dead_url() + "/api/version", timeout=2)
