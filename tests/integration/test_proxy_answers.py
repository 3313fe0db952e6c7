"""Answers in the shape OpenAI sends, whatever the backend leaves out: the proxy in front of the
scripted upstream, whose answers have no `refusal`, no `logprobs` and name its own model id, and
whose `no-usage` scenario never reports usage (the proxy then counts it with the tokenizer
endpoints of the server it is: vLLM reached by URL, or llama-server started by the proxy)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import write_json
from support.proxy_process import free_port
from support.proxy_server import ProxyServer
from support.scripted_llama_server import write_launcher
from support.scripted_upstream import (
    ECHO_PIECES,
    USAGE,
    ScriptedUpstream,
    count_tokens,
    render_prompt,
)

pytestmark = pytest.mark.timeout(60)

REQUESTED = "echo (scripted)"
ASK = [{"role": "user", "content": "hi"}]
WANT_USAGE = {"stream_options": {"include_usage": True}}
# What the scripted tokenizer counts for ASK and the `no-usage` answer, which ends with
# finish_reason "stop": on the model's end-of-turn token, counted but not in the text.
PROMPT_TOKENS = count_tokens(render_prompt(ASK))
COMPLETION_TOKENS = count_tokens("".join(ECHO_PIECES)) + 1
COUNTED = {
    "prompt_tokens": PROMPT_TOKENS,
    "completion_tokens": COMPLETION_TOKENS,
    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
}


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture
def registry(tmp_path: Path, upstream: ScriptedUpstream) -> Path:
    def at_upstream(name: str, backend: str, scenario: str) -> dict[str, Any]:
        config = {"base_url": f"{upstream.url}/v1"}
        return {
            "name": name,
            "backend": backend,
            "served_model_id": scenario,
            "backend_config": config,
        }

    weights = tmp_path / "weights.gguf"
    weights.write_bytes(b"GGUF")
    directory = tmp_path / "configs"
    write_json(
        directory / "model_registry.curated.json",
        [
            {**at_upstream("scripted_echo", "external", "echo"), "display_name": REQUESTED},
            at_upstream("vllm-reports", "vllm", "echo"),  # a vLLM we did not start
            at_upstream("vllm-silent", "vllm", "no-usage"),
            at_upstream("external-silent", "external", "no-usage"),
            {  # started by the proxy, on the scripted llama-server
                "name": "llama-silent",
                "backend": "llamacpp",
                "served_model_id": "no-usage",
                "download_path": str(weights),
            },
        ],
    )
    return directory


@pytest.fixture
def proxy(registry: Path, tmp_path: Path) -> Iterator[ProxyServer]:
    settings = {
        "vllm_single_port": False,  # vLLM entries are reached at their URL
        "vllm_port": free_port(),
        "llama_server_binary": str(write_launcher(tmp_path)),
        "require_template": False,
        "include_non_installed": True,
    }
    with ProxyServer(registry, tmp_path, **settings) as server:
        yield server


def complete(proxy: ProxyServer, model: str = REQUESTED, **extra: Any) -> dict[str, Any]:
    payload = {"model": model, "messages": ASK, **extra}
    response = httpx.post(f"{proxy.url}/v1/chat/completions", json=payload, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def stream(proxy: ProxyServer, model: str = REQUESTED, **extra: Any) -> list[dict[str, Any]]:
    payload = {"model": model, "messages": ASK, "stream": True, **extra}
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


# -- usage in streams --------------------------------------------------------------------------


def usage_chunks(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk for chunk in chunks if chunk.get("usage")]


def assert_ends_with_usage(chunks: list[dict[str, Any]], usage: dict[str, int]) -> None:
    """The last chunk before [DONE] is the usage chunk, in the stream's envelope."""
    last = chunks[-1]
    assert last["choices"] == []
    assert last["usage"] == usage
    assert last["object"] == "chat.completion.chunk"
    assert (last["id"], last["created"], last["model"]) == (
        chunks[0]["id"],
        chunks[0]["created"],
        chunks[0]["model"],
    )
    assert usage_chunks(chunks) == [last]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def tokenizer_calls(upstream: ScriptedUpstream, since: int) -> list[str]:
    return [path for path, _ in upstream.side_requests[since:]]


def test_stream_usage_reported_by_the_backend_is_forwarded(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    before = len(upstream.side_requests)
    assert_ends_with_usage(stream(proxy, "vllm-reports", **WANT_USAGE), USAGE)
    assert tokenizer_calls(upstream, before) == []  # nothing counted when the backend says


def test_stream_usage_is_counted_by_vllm_tokenize(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    before = len(upstream.side_requests)
    assert_ends_with_usage(stream(proxy, "vllm-silent", **WANT_USAGE), COUNTED)
    assert tokenizer_calls(upstream, before) == ["/tokenize", "/tokenize"]
    prompt, text = (body for _, body in upstream.side_requests[before:])
    assert prompt == {
        "model": "no-usage",
        "messages": ASK,
        "add_generation_prompt": True,
    }
    assert text == {
        "model": "no-usage",
        "prompt": "".join(ECHO_PIECES),
        "add_special_tokens": False,
    }


def test_stream_usage_is_counted_by_llama_server_endpoints(proxy: ProxyServer) -> None:
    # The scripted llama-server counts with its /apply-template and /tokenize: these numbers
    # come from nowhere else.
    assert_ends_with_usage(stream(proxy, "llama-silent", **WANT_USAGE), COUNTED)


def test_stream_usage_is_not_invented_for_a_backend_that_cannot_count(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    before = len(upstream.side_requests)
    chunks = stream(proxy, "external-silent", **WANT_USAGE)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage_chunks(chunks) == []
    assert tokenizer_calls(upstream, before) == []


def test_stream_usage_is_not_sent_unless_asked(
    proxy: ProxyServer, upstream: ScriptedUpstream
) -> None:
    before = len(upstream.side_requests)
    assert usage_chunks(stream(proxy, "vllm-reports")) == []
    assert usage_chunks(stream(proxy, "vllm-silent")) == []
    assert tokenizer_calls(upstream, before) == []


def test_counted_stream_usage_is_in_the_request_log(proxy: ProxyServer) -> None:
    stream(proxy, "vllm-silent", **WANT_USAGE)
    deadline = time.monotonic() + 10  # lines are written by a background thread
    while not proxy.log_path.exists() or not proxy.log_path.read_text().strip():
        assert time.monotonic() < deadline, "no request log line"
        time.sleep(0.05)
    record = json.loads(proxy.log_path.read_text().splitlines()[-1])
    assert record["usage"] == COUNTED
