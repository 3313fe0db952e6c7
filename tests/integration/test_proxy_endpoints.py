"""/v1/completions, /v1/embeddings and /v1/responses end to end: the real proxy in front of the
demo's llama-server processes (SmolLM2 for chat and completions, the same GGUF started for
embeddings), and in front of the scripted upstream as `external` entries for what llama.cpp
cannot be made to do (streams that break, the Responses API's events on demand).

The llama-server tests share one proxy and run in order. They check the structure of answers,
never what the model wrote."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import APIError, OpenAI

from conftest import make_demo_workspace, write_json
from support.proxy_process import RunningProxy, Workspace, pid_alive
from support.proxy_server import ProxyServer
from support.scripted_upstream import (
    ECHO_PIECES,
    ECHO_TEXT,
    ENDPOINT_SCENARIOS,
    VECTOR,
    VECTOR_BASE64,
    ScriptedUpstream,
)

pytestmark = pytest.mark.timeout(180)

SMOL = "smollm2 135m (Q4 1)"
EMBED = "smollm2 135m embed (Q4 1)"
SMOL_ENTRY = "smollm2_135m_(Q4_1)"
EMBED_ENTRY = "smollm2_135m_embed_(Q4_1)"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[RunningProxy]:
    workdir = tmp_path_factory.mktemp("endpoints")
    make_demo_workspace(workdir, demo_models)
    with Workspace(workdir).serving() as running:
        yield running


def post(proxy: RunningProxy | ProxyServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{proxy.url}{path}", json=body, timeout=120)


def sse_events(proxy: RunningProxy | ProxyServer, path: str, body: dict[str, Any]) -> list[str]:
    """The stream's events, each as its text without the blank line that ends it."""
    with httpx.stream("POST", f"{proxy.url}{path}", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    return [event for event in text.split("\n\n") if event.strip()]


def data_of(event: str) -> str:
    (line,) = [line for line in event.splitlines() if line.startswith("data:")]
    return line[5:].strip()


def log_records(workdir: Path, count: int) -> list[dict[str, Any]]:
    """The request log once it holds at least `count` lines and the writer has caught up (the
    same lines twice, 0.2 s apart: it writes every 50 ms), so a request that finished just
    before is never counted as one that comes after."""
    log = workdir / "logs" / "chat_proxy.jsonl"
    deadline = time.monotonic() + 10  # the writer thread appends shortly after the response
    previous: list[dict[str, Any]] | None = None
    while True:
        records = [json.loads(line) for line in log.read_text().splitlines()]
        if (len(records) >= count and records == previous) or time.monotonic() > deadline:
            return records
        previous = records
        time.sleep(0.2)


def assert_floats(vector: Any) -> None:
    assert isinstance(vector, list)
    assert vector
    assert all(isinstance(value, float) for value in vector)


# -- the demo registry on llama-server ---------------------------------------------------------


def test_models_list_the_embedding_entry_with_its_capability(proxy: RunningProxy) -> None:
    models = {m["id"]: m for m in httpx.get(f"{proxy.url}/v1/models").json()["data"]}
    assert EMBED in models
    assert models[EMBED]["extensions"]["capabilities"]["embedding"] is True


def test_completion_comes_from_the_model(proxy: RunningProxy) -> None:
    response = post(
        proxy, "/v1/completions", {"model": SMOL, "prompt": "Once upon a time", "max_tokens": 8}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["model"] == SMOL  # the name asked for, not the served id
    choice = body["choices"][0]
    assert isinstance(choice["text"], str)
    assert choice["text"]
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] > 0
    assert body["usage"]["prompt_tokens"] > 0


def test_completion_streams_chunks_then_done(proxy: RunningProxy) -> None:
    body = {"model": SMOL, "prompt": [1, 2, 3], "max_tokens": 8, "stream": True}
    events = sse_events(proxy, "/v1/completions", body)
    assert data_of(events[-1]) == "[DONE]"
    chunks = [json.loads(data_of(event)) for event in events[:-1]]  # every one valid JSON
    assert chunks
    assert {chunk["model"] for chunk in chunks} == {SMOL}
    texts = [choice.get("text") for chunk in chunks for choice in chunk["choices"]]
    assert any(texts)
    finishes = [
        c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c.get("finish_reason")
    ]
    assert finishes[-1] in ("stop", "length")


def test_an_endpoint_the_entry_lacks_is_a_400_naming_what_it_has(proxy: RunningProxy) -> None:
    holder = proxy.health()["slot"]["holder"]
    response = post(
        proxy,
        "/v1/chat/completions",
        {"model": EMBED, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_endpoint", "model")
    assert error["message"] == (
        f"Model '{EMBED}' serves /v1/embeddings only; it does not serve /v1/chat/completions."
    )
    response = post(proxy, "/v1/embeddings", {"model": SMOL, "input": "hi"})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "/v1/chat/completions, /v1/completions and /v1/responses" in message
    assert proxy.health()["slot"]["holder"] == holder  # refused before the slot was touched


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": SMOL}, "prompt"),
        ("/v1/completions", {"model": SMOL, "prompt": ["a", 2]}, "prompt[1]"),
        ("/v1/embeddings", {"model": EMBED, "input": {"text": "x"}}, "input"),
        ("/v1/embeddings", {"input": "x"}, "model"),
        ("/v1/responses", {"model": SMOL}, "input"),
    ],
)
def test_a_bad_body_is_a_400_with_its_param(
    proxy: RunningProxy, path: str, body: dict[str, Any], param: str
) -> None:
    response = post(proxy, path, body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_a_chat_then_embeddings_swap_the_one_model_process_and_back(proxy: RunningProxy) -> None:
    assert proxy.chat(SMOL, max_tokens=4).status_code == 200
    chat_slot = proxy.health()["slot"]
    assert chat_slot["holder"] == SMOL_ENTRY

    response = post(proxy, "/v1/embeddings", {"model": EMBED, "input": "The sky is blue."})
    assert response.status_code == 200, response.text
    embed_slot = proxy.health()["slot"]
    assert embed_slot["holder"] == EMBED_ENTRY
    assert embed_slot["pid"] != chat_slot["pid"]
    assert not pid_alive(chat_slot["pid"])

    assert proxy.chat(SMOL, max_tokens=4).status_code == 200
    back = proxy.health()["slot"]
    assert back["holder"] == SMOL_ENTRY
    assert not pid_alive(embed_slot["pid"])


def test_clients_of_every_endpoint_at_once_each_get_a_whole_answer(proxy: RunningProxy) -> None:
    # A real day: one client streams chat, one streams completions, one embeds, all at once, so
    # the slot swaps the chat model and the embedding model back and forth under them. Every
    # client must get a whole answer (a finished stream, a vector), never a cut-off one.
    rounds = 3
    swaps_before = proxy.health()["slot"]["swaps"]

    def chat_streams() -> list[str]:
        body = {
            "model": SMOL,
            "messages": [{"role": "user", "content": "ping"}],
            "max_tokens": 8,
            "stream": True,
        }
        return [_finished_stream(proxy, "/v1/chat/completions", body) for _ in range(rounds)]

    def completion_streams() -> list[str]:
        body = {"model": SMOL, "prompt": "Once upon a time", "max_tokens": 8, "stream": True}
        return [_finished_stream(proxy, "/v1/completions", body) for _ in range(rounds)]

    def embeddings() -> list[str]:
        outcomes = []
        for _ in range(rounds):
            response = post(proxy, "/v1/embeddings", {"model": EMBED, "input": ["a", "b"]})
            data = response.json().get("data") if response.status_code == 200 else None
            whole = bool(data) and len(data) == 2 and all(d["embedding"] for d in data)
            outcomes.append("whole" if whole else f"{response.status_code}: {response.text}")
        return outcomes

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = [pool.submit(work) for work in (chat_streams, completion_streams, embeddings)]
        outcomes = [future.result(timeout=170) for future in futures]
    assert outcomes == [["whole"] * rounds] * 3
    assert proxy.health()["slot"]["swaps"] > swaps_before  # the two models did take turns


def _finished_stream(proxy: RunningProxy, path: str, body: dict[str, Any]) -> str:
    """ "whole" for a stream whose chunks all parse and whose last choice finished, ending in
    [DONE]; otherwise what went wrong, for the assertion's message."""
    try:
        events = sse_events(proxy, path, body)
    except AssertionError as failure:
        return f"refused: {failure}"
    data = [data_of(event) for event in events if "data:" in event]
    if not data or data[-1] != "[DONE]":
        return f"no [DONE]: {data[-2:]}"
    chunks = [json.loads(item) for item in data[:-1]]
    if any("error" in chunk for chunk in chunks):
        return f"error event: {chunks[-1]}"
    finishes = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    return "whole" if finishes and finishes[-1] in ("stop", "length") else f"unfinished: {finishes}"


def test_embeddings_of_a_string(proxy: RunningProxy) -> None:
    response = post(proxy, "/v1/embeddings", {"model": EMBED, "input": "The sky is blue."})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == EMBED
    (item,) = body["data"]
    assert (item["object"], item["index"]) == ("embedding", 0)
    assert_floats(item["embedding"])
    assert body["usage"]["prompt_tokens"] > 0


def test_embeddings_of_an_array_have_one_dimension(proxy: RunningProxy) -> None:
    texts = ["The sky is blue.", "Grass is green.", "Snow"]
    response = post(proxy, "/v1/embeddings", {"model": EMBED, "input": texts})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [item["index"] for item in data] == [0, 1, 2]
    for item in data:
        assert_floats(item["embedding"])
    assert len({len(item["embedding"]) for item in data}) == 1


def test_embeddings_in_base64_are_passed_through(proxy: RunningProxy) -> None:
    floats = post(proxy, "/v1/embeddings", {"model": EMBED, "input": "Snow"}).json()
    body = {"model": EMBED, "input": "Snow", "encoding_format": "base64"}
    response = post(proxy, "/v1/embeddings", body)
    assert response.status_code == 200, response.text
    (item,) = response.json()["data"]
    assert isinstance(item["embedding"], str)
    raw = base64.b64decode(item["embedding"])
    assert len(raw) == 4 * len(floats["data"][0]["embedding"])  # float32s, one per dimension


def test_a_client_leaving_a_completion_stream_is_recorded_once_and_the_model_serves_on(
    proxy: RunningProxy,
) -> None:
    before = len(log_records(proxy.workdir, 0))
    body = {"model": SMOL, "prompt": "Count to one hundred:", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:") and json.loads(line[5:])["choices"][0].get("text"):
                break  # leave after the first piece of text
    records = log_records(proxy.workdir, before + 1)
    left = [r for r in records[before:] if r["endpoint"] == "/v1/completions"]
    assert [(r["status"], r["outcome"]) for r in left] == [(499, "cancelled")]
    after = post(proxy, "/v1/completions", {"model": SMOL, "prompt": "Hello", "max_tokens": 4})
    assert after.status_code == 200
    assert after.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_responses_from_llama_server_whole_and_streamed(proxy: RunningProxy) -> None:
    body = {"model": SMOL, "input": "Say hi.", "max_output_tokens": 8}
    response = post(proxy, "/v1/responses", body)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "response"
    events = sse_events(proxy, "/v1/responses", {**body, "stream": True})
    names = [event.splitlines()[0] for event in events]
    assert names[0] == "event: response.created"
    assert names[-1] == "event: response.completed"
    assert "event: response.output_text.delta" in names
    for event in events:
        json.loads(data_of(event))


def test_the_request_log_names_each_endpoint(proxy: RunningProxy) -> None:
    records = log_records(proxy.workdir, 1)
    endpoints = {record["endpoint"] for record in records}
    assert {"/v1/completions", "/v1/embeddings", "/v1/chat/completions", "/v1/responses"} <= (
        endpoints
    )


# -- the scripted upstream as external entries -------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture
def scripted(tmp_path: Path, upstream: ScriptedUpstream) -> Iterator[ProxyServer]:
    entries = [
        {
            "name": f"scripted_{scenario}",
            "display_name": f"scripted {scenario}",
            "backend": "external",
            "served_model_id": scenario,
            "backend_config": {"base_url": f"{upstream.url}/v1"},
        }
        for scenario in ENDPOINT_SCENARIOS
    ]
    registry = write_json(tmp_path / "configs" / "model_registry.curated.json", entries).parent
    with ProxyServer(registry, tmp_path, include_non_installed=True) as server:
        yield server


def test_responses_are_relayed_whole(scripted: ProxyServer, upstream: ScriptedUpstream) -> None:
    body = {"model": "scripted echo", "input": "hi", "custom": {"kept": True}}
    response = post(scripted, "/v1/responses", body)
    assert response.status_code == 200
    answer = response.json()
    assert (answer["object"], answer["status"]) == ("response", "completed")
    assert answer["output"][0]["content"][0]["text"] == ECHO_TEXT
    assert upstream.paths[-1] == "/v1/responses"
    assert upstream.requests[-1] == {**body, "model": "echo"}


def test_responses_stream_typed_events_byte_for_byte(scripted: ProxyServer) -> None:
    events = sse_events(
        scripted, "/v1/responses", {"model": "scripted echo", "input": "hi", "stream": True}
    )
    kinds = [event.splitlines()[0].removeprefix("event: ") for event in events]
    assert kinds == [
        "response.created",
        *["response.output_text.delta"] * len(ECHO_PIECES),
        "response.completed",
    ]
    datas = [json.loads(data_of(event)) for event in events]
    assert [d["type"] for d in datas] == kinds
    assert [d["sequence_number"] for d in datas] == list(range(len(events)))
    assert "".join(d["delta"] for d in datas[1:-1]) == "".join(ECHO_PIECES)


@pytest.mark.parametrize("scenario", ["cut-short", "crash"])
def test_a_responses_stream_that_ends_unfinished_ends_with_an_error_event(
    scripted: ProxyServer, scenario: str
) -> None:
    body = {"model": f"scripted {scenario}", "input": "hi", "stream": True}
    events = sse_events(scripted, "/v1/responses", body)
    if scenario == "cut-short":
        assert events[0].startswith("event: response.created")
    last = events[-1]
    assert last.splitlines()[0] == "event: error"
    error = json.loads(data_of(last))
    assert error["type"] == "error"
    assert error["code"] in ("stream_truncated", "upstream_disconnected")
    assert error["message"]
    assert error["sequence_number"] == len(events) - 1  # next after the last relayed
    assert "[DONE]" not in "".join(events)  # not the Responses API's


@pytest.mark.parametrize("scenario", ["cut-short", "crash"])
def test_a_completion_stream_that_ends_unfinished_ends_with_chats_error_event(
    scripted: ProxyServer, scenario: str
) -> None:
    body = {"model": f"scripted {scenario}", "prompt": "hi", "stream": True}
    events = sse_events(scripted, "/v1/completions", body)
    assert data_of(events[-1]) == "[DONE]"
    error = json.loads(data_of(events[-2]))["error"]
    assert error["code"] in ("stream_truncated", "upstream_disconnected")
    pieces = [json.loads(data_of(e))["choices"][0]["text"] for e in events[:-2]]
    # A broken connection may cost what was read together with the break, never part of one.
    expected = list(ECHO_PIECES)
    assert pieces == (expected if scenario == "cut-short" else expected[: len(pieces)])


def test_scripted_completions_and_embeddings_pass_through(scripted: ProxyServer) -> None:
    whole = post(scripted, "/v1/completions", {"model": "scripted echo", "prompt": "hi"}).json()
    assert whole["choices"][0]["text"] == ECHO_TEXT
    assert whole["model"] == "scripted echo"
    floats = post(scripted, "/v1/embeddings", {"model": "scripted echo", "input": ["a", "b"]})
    assert [item["embedding"] for item in floats.json()["data"]] == [VECTOR, VECTOR]
    body = {"model": "scripted echo", "input": "a", "encoding_format": "base64"}
    encoded = post(scripted, "/v1/embeddings", body).json()
    assert encoded["data"][0]["embedding"] == VECTOR_BASE64


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings", "/v1/responses"])
def test_a_backend_4xx_keeps_its_status_and_error(scripted: ProxyServer, path: str) -> None:
    field = "prompt" if path == "/v1/completions" else "input"
    response = post(scripted, path, {"model": "scripted error-400", field: "hi"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_the_log_records_each_failed_stream_once(scripted: ProxyServer) -> None:
    body = {"model": "scripted cut-short", "input": "hi", "stream": True}
    sse_events(scripted, "/v1/responses", body)
    deadline = time.monotonic() + 10
    while not scripted.log_path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in scripted.log_path.read_text().splitlines()]
        if records:
            break
        time.sleep(0.02)
    (record,) = records
    assert (record["endpoint"], record["status"], record["outcome"]) == (
        "/v1/responses",
        502,
        "error",
    )


def _sdk(proxy: ProxyServer) -> OpenAI:
    return OpenAI(base_url=f"{proxy.url}/v1", api_key="EMPTY", timeout=30, max_retries=0)


def test_the_openai_sdk_reads_responses_events_and_their_error_event(
    scripted: ProxyServer,
) -> None:
    events = list(_sdk(scripted).responses.create(model="scripted echo", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "".join(ECHO_PIECES)
    cut = list(_sdk(scripted).responses.create(model="scripted cut-short", input="hi", stream=True))
    last = cut[-1]
    assert last.type == "error"
    assert last.code == "stream_truncated"  # the SDK's ResponseErrorEvent, as OpenAI sends it


def test_the_openai_sdk_raises_for_a_completion_stream_that_ends_unfinished(
    scripted: ProxyServer,
) -> None:
    stream = _sdk(scripted).completions.create(model="scripted cut-short", prompt="hi", stream=True)
    with pytest.raises(APIError, match="ended the stream before the completion was finished"):
        list(stream)
    whole = _sdk(scripted).completions.create(model="scripted echo", prompt="hi")
    assert whole.choices[0].text == ECHO_TEXT
    vectors = _sdk(scripted).embeddings.create(model="scripted echo", input=["a", "b"])
    assert [item.embedding for item in vectors.data] == [VECTOR, VECTOR]
