"""OpenAI's wire shapes end to end: the real `imageworks-chat-proxy` in front of the demo's
llama.cpp servers (llama-server, and llama-cpp-python for those who choose it). Each test checks
the structure of an answer, never what the model wrote."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from conftest import make_demo_workspace
from support.proxy_process import RunningProxy, Workspace, processes_listening_on

pytestmark = pytest.mark.timeout(180)

SMOL = "smollm2 135m (Q4 1)"
PING = [{"role": "user", "content": "ping"}]
VERDICT = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "confident": {"type": "boolean"},
        "reason": {"type": "string", "maxLength": 24},
    },
    "required": ["answer", "confident", "reason"],
    "additionalProperties": False,
}
ASK_VERDICT = [{"role": "user", "content": "Is the sky blue? Answer in JSON."}]


def running_demo(root: Path, demo_models: Path, **env: str) -> Iterator[RunningProxy]:
    make_demo_workspace(root, demo_models)
    workspace = Workspace(root, extra_env=env)
    running = workspace.start_proxy()
    yield running
    running.terminate()
    for pid in processes_listening_on(workspace.model_port):  # never leave a model behind
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[RunningProxy]:
    yield from running_demo(tmp_path_factory.mktemp("llama-server"), demo_models)


@pytest.fixture(scope="module")
def python_proxy(
    tmp_path_factory: pytest.TempPathFactory, demo_models: Path
) -> Iterator[RunningProxy]:
    root = tmp_path_factory.mktemp("llama-cpp-python")
    yield from running_demo(root, demo_models, CHAT_PROXY_LLAMACPP_LAUNCHER="llama-cpp-python")


def complete(proxy: RunningProxy, **extra: Any) -> dict[str, Any]:
    response = proxy.chat(SMOL, **{"max_tokens": 8, **extra})  # `messages` may be replaced
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def stream(proxy: RunningProxy, **extra: Any) -> list[dict[str, Any]]:
    payload = {"model": SMOL, "messages": PING, "max_tokens": 8, "stream": True, **extra}
    url = f"{proxy.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=payload, timeout=120) as response:
        assert response.status_code == 200
        data = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


def matches(schema: dict[str, Any], value: Any) -> bool:
    """Whether `value` satisfies `schema`, for the keywords VERDICT uses."""
    kinds = {"object": dict, "string": str, "boolean": bool}
    if not isinstance(value, kinds[schema["type"]]):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, str):
        return len(value) <= schema.get("maxLength", len(value))
    if not isinstance(value, dict):
        return True
    properties = schema["properties"]
    if not set(schema["required"]) <= set(value):
        return False
    if schema.get("additionalProperties") is False and not set(value) <= set(properties):
        return False
    return all(matches(properties[key], item) for key, item in value.items())


def test_matches_checks_the_verdict_schema() -> None:
    assert matches(VERDICT, {"answer": "yes", "confident": True, "reason": "blue"})
    assert not matches(VERDICT, {"answer": "maybe", "confident": True, "reason": "blue"})
    assert not matches(VERDICT, {"answer": "yes", "confident": "very", "reason": "blue"})
    assert not matches(VERDICT, {"answer": "yes", "confident": True})
    assert not matches(VERDICT, {"answer": "yes", "confident": True, "reason": "x" * 25})
    assert not matches(VERDICT, {"answer": "yes", "confident": True, "reason": "", "more": 1})
    assert not matches(VERDICT, ["yes"])


def json_schema_answer(proxy: RunningProxy) -> Any:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "strict": True, "schema": VERDICT},
    }
    body = complete(proxy, messages=ASK_VERDICT, max_tokens=120, response_format=response_format)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"  # the grammar ended the answer, not max_tokens
    return json.loads(choice["message"]["content"])


def sdk(proxy: RunningProxy) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/v1", api_key="EMPTY", timeout=120, max_retries=0)


# -- responses strict clients accept -----------------------------------------------------------


def test_completion_has_null_refusal_and_logprobs(proxy: RunningProxy) -> None:
    choice = complete(proxy)["choices"][0]
    assert "logprobs" in choice  # native llama-server leaves it out
    assert choice["logprobs"] is None
    assert "refusal" in choice["message"]
    assert choice["message"]["refusal"] is None


def test_completion_names_the_requested_model(proxy: RunningProxy) -> None:
    assert complete(proxy)["model"] == SMOL  # not the served id, smollm2-135m-instruct


def test_stream_chunks_name_the_requested_model(proxy: RunningProxy) -> None:
    chunks = stream(proxy)
    assert {chunk["model"] for chunk in chunks} == {SMOL}


def test_sdk_retrieves_every_listed_model(proxy: RunningProxy) -> None:
    client = sdk(proxy)
    listed = httpx.get(f"{proxy.url}/v1/models").json()["data"]
    assert SMOL in [item["id"] for item in listed]
    for item in listed:  # `smollm2%20135m%20(Q4%201)` on the wire
        assert client.models.retrieve(item["id"]).to_dict() == item


def test_llama_cpp_python_stream_chunks_name_the_requested_model(
    python_proxy: RunningProxy,
) -> None:
    chunks = stream(python_proxy)  # its JSON is spaced: `"model": "..."`
    assert {chunk["model"] for chunk in chunks} == {SMOL}


# -- structured output ------------------------------------------------------------------------


def test_json_schema_answer_matches_the_schema(proxy: RunningProxy) -> None:
    assert matches(VERDICT, json_schema_answer(proxy))


def test_llama_cpp_python_json_schema_answer_matches_the_schema(
    python_proxy: RunningProxy,
) -> None:
    # llama-cpp-python refuses OpenAI's json_schema (HTTP 500): it gets its own form.
    assert matches(VERDICT, json_schema_answer(python_proxy))
