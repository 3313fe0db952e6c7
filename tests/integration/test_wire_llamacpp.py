"""OpenAI's wire shapes end to end: the real `imageworks-chat-proxy` in front of the demo's
llama.cpp servers (llama-server, and llama-cpp-python for those who choose it). Each test checks
the structure of an answer, never what the model wrote.

Where llama-cpp-python is not installed, its stand-in serves the test of the form the proxy gives
its requests, and the tests of what the real server writes on the wire are skipped."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from conftest import make_demo_workspace
from imageworks.backends.base import Dialect, Target
from imageworks.chat_proxy.forwarding import Forwarder, new_session
from imageworks.chat_proxy.requests import parse_chat_request
from imageworks.chat_proxy.usage import Generated, count_usage, tokenizer_for
from support.llama_cpp_python import requires_llama_cpp_python, serve_with_llama_cpp_python
from support.proxy_process import RunningProxy, Workspace

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


def demo_workspace(root: Path, demo_models: Path) -> Workspace:
    make_demo_workspace(root, demo_models)
    return Workspace(root)


def running(workspace: Workspace) -> Iterator[RunningProxy]:
    with workspace.serving() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Workspace:
    return demo_workspace(tmp_path_factory.mktemp("llama-server"), demo_models)


@pytest.fixture(scope="module")
def proxy(workspace: Workspace) -> Iterator[RunningProxy]:
    yield from running(workspace)


@pytest.fixture(scope="module")
def python_proxy(
    tmp_path_factory: pytest.TempPathFactory, demo_models: Path
) -> Iterator[RunningProxy]:
    root = tmp_path_factory.mktemp("llama-cpp-python")
    yield from running(serve_with_llama_cpp_python(demo_workspace(root, demo_models)))


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


@requires_llama_cpp_python
def test_llama_cpp_python_stream_chunks_name_the_requested_model(
    python_proxy: RunningProxy,
) -> None:
    chunks = stream(python_proxy)  # its JSON is spaced: `"model": "..."`
    assert {chunk["model"] for chunk in chunks} == {SMOL}


# -- usage in streams --------------------------------------------------------------------------


def assert_usage_chunk(chunk: dict[str, Any]) -> None:
    assert chunk["choices"] == []
    usage = chunk["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_with_include_usage_ends_with_a_usage_chunk(proxy: RunningProxy) -> None:
    chunks = stream(proxy, stream_options={"include_usage": True})
    assert_usage_chunk(chunks[-1])  # llama-server's own, forwarded
    assert chunks[-1]["model"] == SMOL
    assert [chunk for chunk in chunks if chunk.get("usage")] == [chunks[-1]]


def test_sdk_stream_reads_the_usage(proxy: RunningProxy) -> None:
    events = sdk(proxy).chat.completions.create(
        model=SMOL,
        messages=PING,  # type: ignore[arg-type]
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    usages = [event.usage for event in events if event.usage is not None]
    assert len(usages) == 1
    assert usages[0].total_tokens == usages[0].prompt_tokens + usages[0].completion_tokens


async def test_usage_counted_by_llama_server_endpoints_is_what_it_reports(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    # The counting the proxy falls back on, checked against the real server's own numbers.
    complete(proxy)  # the demo model is loaded
    target = Target(
        base_url=f"http://127.0.0.1:{workspace.model_port}/v1",
        model="smollm2-135m-instruct",
        label="llamacpp:smollm2",
        dialect=Dialect.LLAMA_SERVER,
    )
    system = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
    question = {"role": "user", "content": "What is 2+2?"}
    finishes: set[str] = set()
    async with new_session() as session:
        forwarder = Forwarder(session, backend_timeout_s=60, stream_idle_timeout_s=60)
        for max_tokens in (3, 100):  # cut off (`length`), and ended by the model (`stop`)
            body = {"messages": [system, question], "max_tokens": max_tokens, "temperature": 0}
            typed = parse_chat_request(json.dumps({"model": target.model, **body}).encode())
            answer = await forwarder.complete(target, typed)
            choice = answer.parsed["choices"][0]
            reported = answer.parsed["usage"]
            tokenizer = tokenizer_for(
                target.dialect, target.model, functools.partial(forwarder.backend_json, target)
            )
            assert tokenizer is not None
            generated = [Generated(choice["message"]["content"], choice["finish_reason"])]
            counted = await count_usage(tokenizer, body, generated, target.label)
            assert counted == {key: reported[key] for key in counted}, choice["finish_reason"]
            finishes.add(choice["finish_reason"])
    assert finishes == {"length", "stop"}


@requires_llama_cpp_python
def test_llama_cpp_python_stream_gets_no_invented_usage(python_proxy: RunningProxy) -> None:
    # It reports no usage in streams and has no template endpoint to count the prompt with.
    chunks = stream(python_proxy, stream_options={"include_usage": True})
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert not [chunk for chunk in chunks if chunk.get("usage")]


# -- structured output ------------------------------------------------------------------------


def test_json_schema_answer_matches_the_schema(proxy: RunningProxy) -> None:
    assert matches(VERDICT, json_schema_answer(proxy))


def test_llama_cpp_python_json_schema_answer_matches_the_schema(
    python_proxy: RunningProxy,
) -> None:
    # llama-cpp-python refuses OpenAI's json_schema (HTTP 500): it gets its own form. (Its
    # stand-in answers that form with JSON the schema allows, as the real grammar makes it.)
    assert matches(VERDICT, json_schema_answer(python_proxy))
