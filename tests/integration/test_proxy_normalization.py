"""Normalization seen from a real client: the OpenAI SDK against the proxy, in front of the
scripted upstream (legacy function calls, think tags) and a fake Ollama (native path)."""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import write_json
from support.fake_ollama import FakeOllama
from support.proxy_server import ProxyServer
from support.scripted_upstream import ScriptedUpstream

pytestmark = pytest.mark.timeout(60)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def png(width: int = 1, height: int = 1) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def image_part(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(installed=["llava:7b", "qwen3:8b"]) as server:
        yield server


@pytest.fixture
def registry(tmp_path: Path, upstream: ScriptedUpstream, ollama: FakeOllama) -> Path:
    def scripted(name: str, scenario: str, **fields: Any) -> dict[str, Any]:
        return {
            "name": name,
            "backend": "external",
            "served_model_id": scenario,
            "backend_config": {"base_url": f"{upstream.url}/v1"},
            **fields,
        }

    directory = tmp_path / "configs"
    write_json(
        directory / "model_registry.curated.json",
        [
            scripted("legacy", "function-call", capabilities={"tools": True}),
            scripted("parallel", "tool-calls"),
            scripted("thinker", "think"),
            scripted("text-only", "echo", capabilities={"vision": False, "tools": False}),
            scripted("seer", "echo", capabilities={"vl": True}),
            {
                "name": "llava",
                "backend": "ollama",
                "served_model_id": "llava:7b",
                "capabilities": {"vision": True, "tools": True},
                "backend_config": {"base_url": ollama.url, "extra_args": ["--num-ctx", "4096"]},
            },
            {
                "name": "qwen",  # no num_ctx: plain requests take Ollama's /v1
                "backend": "ollama",
                "served_model_id": "qwen3:8b",
                "backend_config": {"base_url": ollama.url},
            },
        ],
    )
    return directory


@pytest.fixture
def proxy(registry: Path, tmp_path: Path) -> Iterator[ProxyServer]:
    with ProxyServer(registry, tmp_path, include_non_installed=True) as server:
        yield server


def sdk(proxy: ProxyServer) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/v1", api_key="EMPTY", max_retries=0)


ASK = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "celsius": {"type": "number"}},
    "required": ["city", "celsius"],
}


def test_legacy_function_call_reaches_the_sdk_as_tool_calls(proxy: ProxyServer) -> None:
    completion = sdk(proxy).chat.completions.create(model="legacy", messages=ASK)  # type: ignore[arg-type]
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.function_call is None
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}'


def test_legacy_function_call_stream_reaches_the_sdk_as_tool_calls(proxy: ProxyServer) -> None:
    with sdk(proxy).chat.completions.stream(model="legacy", messages=ASK) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}'


def test_disabled_tool_normalization_passes_function_call_through(
    registry: Path, tmp_path: Path
) -> None:
    with ProxyServer(
        registry, tmp_path, include_non_installed=True, disable_tool_normalization=True
    ) as proxy:
        body = httpx.post(
            f"{proxy.url}/v1/chat/completions", json={"model": "legacy", "messages": ASK}
        ).json()
    message = body["choices"][0]["message"]
    assert message["function_call"]["name"] == "get_weather"
    assert "tool_calls" not in message
    assert body["choices"][0]["finish_reason"] == "function_call"


def test_parallel_tool_calls_stream_intact(proxy: ProxyServer) -> None:
    with sdk(proxy).chat.completions.stream(model="parallel", messages=ASK) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2


def test_empty_tools_are_stripped_before_the_backend(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    sdk(proxy).chat.completions.create(
        model="seer",
        messages=ASK,  # type: ignore[arg-type]
        tools=[],
        tool_choice="auto",
    )
    received = upstream.requests[-1]
    assert "tools" not in received
    assert "tool_choice" not in received


def test_tools_to_a_model_without_tools_is_a_capability_error(proxy: ProxyServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(proxy).chat.completions.create(
            model="text-only",
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["type"] == "capability_error"
    assert "text-only" in error["message"]
    assert "tools" in error["message"]


def test_image_to_a_model_without_vision_is_a_capability_error(proxy: ProxyServer) -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "what?"}, image_part(png())]}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(proxy).chat.completions.create(model="text-only", messages=[message])  # type: ignore[list-item]
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "capability_error"
    assert "vision" in caught.value.body["message"]


@pytest.mark.parametrize(
    ("part", "status", "code"),
    [
        (image_part(b"not a png at all"), 400, "invalid_image"),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}},
            400,
            "invalid_image",
        ),
        (image_part(png(), "image/bmp"), 400, "unsupported_image_type"),
        ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, 400, None),
    ],
)
def test_bad_images_are_refused_naming_message_and_part(
    proxy: ProxyServer, part: dict[str, Any], status: int, code: str | None
) -> None:
    message = {"role": "user", "content": [{"type": "text", "text": "what?"}, part]}
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions", json={"model": "seer", "messages": [message]}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == "messages[0].content[1]"
    assert error["message"].startswith("messages[0].content[1]")
    if code:
        assert error["code"] == code


def test_oversized_image_is_413(registry: Path, tmp_path: Path) -> None:
    big = png(64, 64)
    with ProxyServer(
        registry, tmp_path, include_non_installed=True, max_image_bytes=len(big) - 1
    ) as proxy:
        message = {"role": "user", "content": [image_part(big)]}
        with pytest.raises(openai.APIStatusError) as caught:
            sdk(proxy).chat.completions.create(model="seer", messages=[message])  # type: ignore[list-item]
    assert caught.value.status_code == 413


def test_vision_history_is_trimmed_and_the_image_carried_forward(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    picture = image_part(png())
    messages = [
        {"role": "system", "content": "You see images."},
        {"role": "user", "content": [{"type": "text", "text": "Describe this."}, picture]},
        {"role": "assistant", "content": "A red pixel."},
        {"role": "user", "content": "What about the left corner?"},
    ]
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions", json={"model": "seer", "messages": messages}
    )
    assert response.status_code == 200
    sent = upstream.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]
    parts = sent[1]["content"]
    assert picture in parts
    assert {"type": "text", "text": "What about the left corner?"} in parts


def test_vision_history_untouched_when_truncation_is_off(
    registry: Path, tmp_path: Path, upstream: ScriptedUpstream
) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Describe."}, image_part(png())]},
        {"role": "assistant", "content": "A red pixel."},
        {"role": "user", "content": "And now?"},
    ]
    with ProxyServer(
        registry, tmp_path, include_non_installed=True, vision_truncate_history=False
    ) as proxy:
        response = httpx.post(
            f"{proxy.url}/v1/chat/completions", json={"model": "seer", "messages": messages}
        )
    assert response.status_code == 200
    assert upstream.requests[-1]["messages"] == messages


def test_think_tags_pass_through_unless_splitting_is_on(registry: Path, tmp_path: Path) -> None:
    question = [{"role": "user", "content": "2+2?"}]
    with ProxyServer(registry, tmp_path, include_non_installed=True) as proxy:
        plain = sdk(proxy).chat.completions.create(model="thinker", messages=question)  # type: ignore[arg-type]
    assert "<think>" in (plain.choices[0].message.content or "")

    with ProxyServer(
        registry, tmp_path, include_non_installed=True, split_think_tags=True
    ) as proxy:
        whole = sdk(proxy).chat.completions.create(model="thinker", messages=question)  # type: ignore[arg-type]
        with httpx.stream(
            "POST",
            f"{proxy.url}/v1/chat/completions",
            json={"model": "thinker", "messages": question, "stream": True},
        ) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    message = whole.choices[0].message.model_dump()
    assert message["content"] == "The answer is 4."
    assert message["reasoning_content"] == "pondering"
    deltas = [httpx.Response(200, content=line[6:]).json()["choices"] for line in lines]
    reasoning = "".join(c[0]["delta"].get("reasoning_content") or "" for c in deltas if c)
    content = "".join(c[0]["delta"].get("content") or "" for c in deltas if c)
    assert reasoning == "pondering"
    assert content == "The answer is 4."


def test_ollama_native_path_sends_raw_images_and_num_ctx(
    proxy: ProxyServer, ollama: FakeOllama
) -> None:
    picture = png()
    message = {"role": "user", "content": [{"type": "text", "text": "what?"}, image_part(picture)]}
    completion = sdk(proxy).chat.completions.create(model="llava", messages=[message])  # type: ignore[list-item]
    assert completion.choices[0].message.content
    assert completion.object == "chat.completion"
    sent = ollama.chat_requests[-1]
    assert sent["messages"][0]["images"] == [base64.b64encode(picture).decode()]
    assert sent["options"]["num_ctx"] == 4096


def test_ollama_tool_calls_reach_the_sdk_with_json_arguments(proxy: ProxyServer) -> None:
    client = sdk(proxy)
    whole = client.chat.completions.create(
        model="llava",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    (call,) = whole.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"
    assert call.function.arguments == '{"city": "Paris"}'
    assert whole.choices[0].finish_reason == "tool_calls"

    with client.chat.completions.stream(
        model="llava",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    ) as stream:
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls or []
    assert streamed.function.arguments == '{"city": "Paris"}'


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}, WEATHER),
        ({"type": "json_object"}, "json"),
    ],
    ids=["json_schema", "json_object"],
)
def test_ollama_structured_output_is_sent_as_format(
    proxy: ProxyServer, ollama: FakeOllama, response_format: dict[str, Any], expected: Any
) -> None:
    before = len(ollama.calls)
    completion = sdk(proxy).chat.completions.create(
        model="qwen",
        messages=ASK,  # type: ignore[arg-type]
        response_format=response_format,  # type: ignore[arg-type]
    )
    assert completion.object == "chat.completion"
    ((method, path, sent),) = [c for c in ollama.calls[before:] if "chat" in c[1]]
    assert (method, path) == ("POST", "/api/chat")  # Ollama's /v1 drops response_format
    assert sent["format"] == expected


def test_model_without_chat_template_is_refused_with_the_fix(
    tmp_path: Path, demo_models: Path
) -> None:
    directory = tmp_path / "configs"
    write_json(
        directory / "model_registry.curated.json",
        [
            {
                # Gemma's GGUF embeds no template; without --chat_format it has none
                "name": "bare-gemma",
                "backend": "llamacpp",
                "download_path": str(demo_models / "gemma-3-270m-q4_k_m.gguf"),
            }
        ],
    )
    with ProxyServer(directory, tmp_path) as proxy:
        response = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "bare-gemma", "messages": ASK},
        )
        health = httpx.get(f"{proxy.url}/v1/health").json()
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "chat_template_missing"
    assert "bare-gemma" in error["message"]
    assert "chat_template.path" in error["message"]
    assert health["slot"]["swaps"] == 0  # refused before anything was started
