"""End to end through the real `imageworks-chat-proxy` console script and real llama.cpp
processes serving the two demo models (SmolLM2-135M and Gemma 3 270M, on CPU).

The tests share one proxy and run in order: they walk through what a user does."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from conftest import make_demo_workspace
from support.llama_cpp_python import serve_with_llama_cpp_python
from support.proxy_process import RunningProxy, Workspace, pid_alive, processes_listening_on

pytestmark = pytest.mark.timeout(180)

SMOL = "smollm2 135m (Q4 1)"
GEMMA = "gemma3 270m (Q4 K M)"
EMBED = "smollm2 135m embed (Q4 1)"  # the demo's embedding entry (test_proxy_endpoints.py)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[RunningProxy]:
    workdir = tmp_path_factory.mktemp("proxy")
    make_demo_workspace(workdir, demo_models)
    with Workspace(workdir).serving() as running:  # some tests end it: then no SIGTERM
        yield running


def test_models_lists_the_demo_models(proxy: RunningProxy) -> None:
    body = httpx.get(f"{proxy.url}/v1/models").json()
    assert [item["id"] for item in body["data"]] == [GEMMA, SMOL, EMBED]


def test_non_stream_completion_comes_from_the_model(proxy: RunningProxy) -> None:
    response = proxy.chat(SMOL, max_tokens=16)  # the runbook's curl payload, capped
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] > 0
    assert proxy.health()["active_backend"] == "smollm2_135m_(Q4_1)"


def test_stream_completion_arrives_as_events(proxy: RunningProxy) -> None:
    payload = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "ping"}],
        "max_tokens": 12,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=payload, timeout=120
    ) as response:
        assert response.status_code == 200
        data = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert any(pieces)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_sdk_lists_completes_and_streams(proxy: RunningProxy) -> None:
    client = OpenAI(base_url=f"{proxy.url}/v1", api_key="EMPTY", timeout=120)
    assert {model.id for model in client.models.list()} == {GEMMA, SMOL, EMBED}

    completion = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "ping"}], max_tokens=12
    )
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "ping"}], max_tokens=12, stream=True
    )
    deltas = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(deltas)


def _stream_chunks(proxy: RunningProxy, start: threading.Barrier) -> list[dict[str, Any]]:
    payload = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "ping"}],
        "max_tokens": 12,
        "stream": True,
    }
    start.wait(timeout=30)
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=payload, timeout=120
    ) as response:
        assert response.status_code == 200
        data = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def _three_streams_at_once(proxy: RunningProxy) -> None:
    """Three streams sent at the same moment each get content and a finish_reason."""
    start = threading.Barrier(3)
    with ThreadPoolExecutor(max_workers=3) as pool:
        streams = [pool.submit(_stream_chunks, proxy, start) for _ in range(3)]
        results = [stream.result(timeout=150) for stream in streams]
    for chunks in results:
        choices = [choice for chunk in chunks for choice in chunk["choices"]]
        assert any(choice["delta"].get("content") for choice in choices)
        finishes = [choice["finish_reason"] for choice in choices if choice.get("finish_reason")]
        assert finishes
        assert finishes[-1] in ("stop", "length")
    assert len({chunks[0]["id"] for chunks in results}) == 3


def test_concurrent_streams_each_get_content_and_a_finish_reason(proxy: RunningProxy) -> None:
    # llama-cpp-python's server aborted a running stream when the next request arrived.
    _three_streams_at_once(proxy)


def test_llama_cpp_python_serves_concurrent_streams_in_turn(
    tmp_path: Path, demo_models: Path
) -> None:
    # The second launcher, for people who have it (else its stand-in): started with
    # --interrupt_requests False, it queues concurrent requests instead of cutting the running
    # one short.
    make_demo_workspace(tmp_path, demo_models)
    workspace = serve_with_llama_cpp_python(Workspace(tmp_path))
    other = workspace.start_proxy()
    try:
        _three_streams_at_once(other)
        argv = (tmp_path / "logs" / "llamacpp").glob("smollm2*.log")
        assert "--interrupt_requests False" in next(argv).read_text()
    finally:
        other.terminate()
    assert processes_listening_on(workspace.model_port) == []


def test_swap_stops_the_old_process_and_the_new_model_answers(proxy: RunningProxy) -> None:
    proxy.chat(SMOL, max_tokens=4)
    before = proxy.health()["slot"]
    assert before["holder"] == "smollm2_135m_(Q4_1)"
    old_pid = before["pid"]
    assert pid_alive(old_pid)

    response = proxy.chat(GEMMA, max_tokens=8)  # a base model: always capped
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")

    after = proxy.health()["slot"]
    assert after["holder"] == "gemma3_270m_(Q4_K_M)"
    assert after["pid"] != old_pid
    assert not pid_alive(old_pid)
    log_dir = proxy.workdir / "logs" / "llamacpp"
    assert (log_dir / "gemma3_270m_Q4_K_M.log").read_text()


def test_health_and_models_answer_at_once_while_a_model_loads(proxy: RunningProxy) -> None:
    assert proxy.health()["active_backend"] == "gemma3_270m_(Q4_K_M)"
    result: dict[str, httpx.Response] = {}
    swap_back = threading.Thread(target=lambda: result.update(r=proxy.chat(SMOL, max_tokens=4)))
    swap_back.start()
    seen_loading = False
    while swap_back.is_alive():
        health = proxy.health()  # each call bounded by a 5 s client timeout
        if health["slot"]["state"] in ("stopping", "starting"):  # gemma going, smollm2 coming
            seen_loading = True
            assert health["status"] == "ok"
            # the model list does not wait for the swap either
            models = httpx.get(f"{proxy.url}/v1/models", timeout=5).json()
            assert [item["id"] for item in models["data"]] == [GEMMA, SMOL, EMBED]
            break
        time.sleep(0.01)
    swap_back.join()
    assert seen_loading, "the health check never saw the load in progress"
    assert result["r"].status_code == 200


def test_request_log_has_a_line_per_request(proxy: RunningProxy) -> None:
    log = proxy.workdir / "logs" / "chat_proxy.jsonl"
    deadline = time.monotonic() + 10  # lines are written by a background thread
    while len(records := [json.loads(line) for line in log.read_text().splitlines()]) < 7:
        assert time.monotonic() < deadline, records
        time.sleep(0.05)
    assert {r["outcome"] for r in records} == {"ok"}
    streamed = [r for r in records if r["stream"]]
    assert streamed
    assert all(r["ttft_ms"] is not None for r in streamed)


def test_sigterm_stops_the_proxy_and_its_model_process(proxy: RunningProxy) -> None:
    model_pid = proxy.health()["slot"]["pid"]
    assert pid_alive(model_pid)
    proxy.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it
    assert proxy.process.wait(timeout=90) in (0, -signal.SIGTERM)
    assert not pid_alive(model_pid)
    assert "Application shutdown complete" in (proxy.workdir / "proxy.out").read_text()
