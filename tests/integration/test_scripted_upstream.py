"""The scripted upstream does what the proxy fault-injection tests rely on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support.scripted_upstream import SCENARIOS, ScriptedUpstream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]


@pytest.fixture
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture
def client(upstream: ScriptedUpstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream.url + "/v1", timeout=5.0) as http:
        yield http


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def events(lines: Iterator[str]) -> Iterator[str]:
    """The `data:` payloads of an SSE body, in order."""
    for line in lines:
        if line:
            assert line.startswith("data: "), line
            yield line.removeprefix("data: ")


def test_health_and_models(upstream: ScriptedUpstream, client: httpx.Client) -> None:
    assert httpx.get(upstream.url + "/health").json() == {"status": "ok"}
    models = client.get("/models").json()
    assert models["object"] == "list"
    assert [model["id"] for model in models["data"]] == list(SCENARIOS)


def test_echo_non_stream_and_recording(upstream: ScriptedUpstream, client: httpx.Client) -> None:
    response = client.post(
        "/chat/completions", json=chat("echo"), headers={"Authorization": "Bearer sk-test"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == "chatcmpl-scripted-1"
    assert body["object"] == "chat.completion"
    assert body["model"] == "echo"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello from the scripted upstream.",
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert upstream.wait_for_request(1, timeout=1)
    assert upstream.requests == [chat("echo")]
    assert upstream.headers[0]["authorization"] == "Bearer sk-test"
    assert upstream.disconnects == 0


def test_echo_stream_event_sequence(client: httpx.Client) -> None:
    request = chat("echo", stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = list(events(response.iter_lines()))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-scripted-1"}
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(delta.get("content", "") for delta in deltas) == "Hello from upstream"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == 12


def test_no_usage_stream_has_no_usage_even_when_asked(client: httpx.Client) -> None:
    request = chat("no-usage", stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/chat/completions", json=request) as response:
        payloads = list(events(response.iter_lines()))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("usage" in chunk for chunk in chunks)
    assert "usage" not in client.post("/chat/completions", json=chat("no-usage")).json()


def test_tokenizer_endpoints_count_words(upstream: ScriptedUpstream) -> None:
    messages = [{"role": "user", "content": "two words"}]
    with httpx.Client(base_url=upstream.url, timeout=5.0) as root:
        prompt = root.post("/apply-template", json={"messages": messages}).json()["prompt"]
        tokens = root.post("/tokenize", json={"content": prompt}).json()["tokens"]
        chat_count = root.post("/tokenize", json={"model": "m", "messages": messages}).json()
        text_count = root.post("/tokenize", json={"model": "m", "prompt": "a b c"}).json()
    assert prompt == "<|user|> two words\n<|assistant|>"
    assert len(tokens) == 4
    assert chat_count == {"count": 4}
    assert text_count == {"count": 3}
    assert [path for path, _ in upstream.side_requests] == ["/apply-template", *["/tokenize"] * 3]


def test_gated_first_chunk_arrives_before_release(
    upstream: ScriptedUpstream, client: httpx.Client
) -> None:
    with client.stream("POST", "/chat/completions", json=chat("gated", stream=True)) as response:
        payloads = events(response.iter_lines())
        assert json.loads(next(payloads))["choices"][0]["delta"]["role"] == "assistant"
        # Read timeout is 5 s and the gate is still closed: this only passes if the server
        # flushed the chunk on its own.
        assert json.loads(next(payloads))["choices"][0]["delta"] == {"content": "Hello"}
        upstream.release()
        rest = list(payloads)
    assert rest[-1] == "[DONE]"
    assert [json.loads(p)["choices"][0]["delta"].get("content") for p in rest[:2]] == [
        " from",
        " upstream",
    ]


def test_crash_stream_breaks_after_two_chunks(client: httpx.Client) -> None:
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"),
        client.stream("POST", "/chat/completions", json=chat("crash", stream=True)) as response,
    ):
        received.extend(events(response.iter_lines()))
    assert [json.loads(p)["choices"][0]["delta"] for p in received] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
    ]


def test_crash_non_stream_is_truncated_json(client: httpx.Client) -> None:
    response = client.post("/chat/completions", json=chat("crash"))
    assert response.status_code == 200
    assert response.text == '{"id": "chatcmpl-x", "choi'
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_hang_stream_client_close_counts_disconnect(
    upstream: ScriptedUpstream, client: httpx.Client
) -> None:
    with client.stream("POST", "/chat/completions", json=chat("hang", stream=True)) as response:
        first = json.loads(next(events(response.iter_lines())))
        assert first["choices"][0]["delta"]["role"] == "assistant"
    assert upstream.wait_for_disconnect(timeout=5)
    assert upstream.disconnects == 1


def test_hang_non_stream_client_timeout_counts_disconnect(
    upstream: ScriptedUpstream, client: httpx.Client
) -> None:
    with pytest.raises(httpx.ReadTimeout):
        client.post("/chat/completions", json=chat("hang"), timeout=0.3)
    assert upstream.wait_for_disconnect(timeout=5)


@pytest.mark.parametrize(
    ("model", "status", "error_type", "code"),
    [
        ("error-400", 400, "invalid_request_error", "context_length_exceeded"),
        ("error-500", 500, "server_error", None),
        ("no-such-model", 404, "invalid_request_error", "model_not_found"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_json_errors(
    client: httpx.Client, model: str, status: int, error_type: str, code: str | None, stream: bool
) -> None:
    response = client.post("/chat/completions", json=chat(model, stream=stream))
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (error_type, code)
    if model == "error-400":
        assert error["param"] == "messages"
        assert "maximum context length is 2048 tokens" in error["message"]


def test_html_error(client: httpx.Client) -> None:
    response = client.post("/chat/completions", json=chat("error-html"))
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/html")
    with pytest.raises(json.JSONDecodeError):
        response.json()


async def test_usable_from_async_tests(upstream: ScriptedUpstream) -> None:
    async with (
        httpx.AsyncClient(base_url=upstream.url + "/v1", timeout=5.0) as http,
        http.stream("POST", "/chat/completions", json=chat("gated", stream=True)) as response,
    ):
        lines = response.aiter_lines()
        seen = [await anext(lines) for _ in range(4)]  # role, blank, first content, blank
        assert json.loads(seen[2].removeprefix("data: "))["choices"][0]["delta"]["content"] == (
            "Hello"
        )
        assert await upstream.wait_for_request_async(1, timeout=1)
        upstream.release()
        rest = [line async for line in lines if line]
    assert rest[-1] == "data: [DONE]"
