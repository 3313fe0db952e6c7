"""llama.cpp's router API driven as Open WebUI's llama.cpp connection drives it (base URL
without `/v1`: list, load, chat at `/v1/chat/completions`, unload), against the real proxy and
real llama-server processes serving the two demo models.

The demo's llama-server is started through a wrapper that waits two seconds before it execs
the real server, so a load stays in `loading` long enough to be seen. The tests share one
proxy and run in order, as a user's session would."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import make_demo_workspace
from imageworks.backends.llamacpp import find_llama_server
from support.model_servers import SLOW_START, serve_through
from support.proxy_process import RunningProxy, Workspace, pid_alive, processes_listening_on

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SMOL = "smollm2 135m (Q4 1)"
GEMMA = "gemma3 270m (Q4 K M)"
EMBED = "smollm2 135m embed (Q4 1)"  # the demo's embedding entry
FAILING_SERVER = "#!/bin/sh\necho 'error: cannot open the weights' >&2\nexit 3\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("router")
    make_demo_workspace(root, demo_models)
    ws = Workspace(root)
    server = find_llama_server(None).binary
    assert server is not None, "llama-server is part of the demo dependencies"
    serve_through(ws, SLOW_START.format(delay=2, server=server))
    yield ws
    ws.close()


@pytest.fixture(scope="module")
def proxy(workspace: Workspace) -> Iterator[RunningProxy]:
    with workspace.serving() as running:
        yield running


def statuses(url: str, path: str = "/models") -> dict[str, dict[str, Any]]:
    response = httpx.get(url + path, timeout=10)
    assert response.status_code == 200
    return {item["id"]: item["status"] for item in response.json()["data"]}


def post(url: str, path: str, body: Any, **headers: str) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=180)


class EventLog:
    """`GET /models/sse` read in a thread: every event's JSON, in order."""

    def __init__(self, url: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.comments = 0
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url,), daemon=True)

    def __enter__(self) -> EventLog:
        self._thread.start()
        assert self._opened.wait(timeout=30), "the event stream never opened"
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _read(self, url: str) -> None:
        with httpx.stream("GET", f"{url}/models/sse", timeout=60) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            self._opened.set()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
                elif line.startswith(":"):
                    self.comments += 1
                if self._stop.is_set():
                    return

    def statuses_of(self, model: str) -> list[str]:
        return [e["data"]["status"] for e in self.events if e["model"] == model]

    def wait_for(self, model: str, status: str) -> None:
        deadline = time.monotonic() + 120
        while status not in self.statuses_of(model):
            assert time.monotonic() < deadline, f"{model} never became {status}: {self.events}"
            time.sleep(0.05)


def test_router_lists_every_model_unloaded_with_the_v1_ids(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    listed = httpx.get(f"{proxy.url}/models", timeout=10).json()
    v1 = httpx.get(f"{proxy.url}/v1/models", timeout=10).json()
    assert listed["object"] == "list"
    assert [item["id"] for item in listed["data"]] == [item["id"] for item in v1["data"]]
    assert [item["id"] for item in listed["data"]] == [GEMMA, SMOL, EMBED]
    for item in listed["data"]:
        assert item["object"] == "model"
        assert isinstance(item["created"], int)
        assert isinstance(item["owned_by"], str)
        assert item["status"] == {"value": "unloaded"}
    assert statuses(proxy.url, "/v1/models") == statuses(proxy.url)
    assert processes_listening_on(workspace.model_port) == []


def test_router_load_streams_loading_then_loaded_and_reads_start_nothing(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    answers: list[httpx.Response] = []
    with EventLog(proxy.url) as log:
        loader = threading.Thread(
            target=lambda: answers.append(post(proxy.url, "/models/load", {"model": SMOL}))
        )
        loader.start()
        log.wait_for(SMOL, "loading")
        # While the model loads, both listings answer, say so, and start nothing else.
        assert not answers, "the load answered before its model was ready"
        during = statuses(proxy.url)
        assert during[SMOL]["value"] == "loading"
        assert during[SMOL]["step"]
        assert during[GEMMA] == {"value": "unloaded"}
        assert statuses(proxy.url, "/v1/models")[SMOL]["value"] == "loading"
        loader.join(timeout=180)
        log.wait_for(SMOL, "loaded")
    assert answers[0].status_code == 200
    assert answers[0].json() == {"success": True}
    smol = log.statuses_of(SMOL)
    assert smol[0] == "unloaded"  # the stream begins with the state it found
    assert smol.index("loading") < smol.index("loaded")
    assert log.statuses_of(GEMMA) == ["unloaded"]
    loading = next(e for e in log.events if e["model"] == SMOL and e["data"]["status"] == "loading")
    assert loading["event"] == "status_change"
    assert loading["data"]["progress"]["current"] == loading["data"]["step"]
    assert statuses(proxy.url)[SMOL] == {"value": "loaded"}
    assert statuses(proxy.url, "/v1/models")[SMOL] == {"value": "loaded"}
    assert len(processes_listening_on(workspace.model_port)) == 1


def test_router_chat_after_load_answers_whole_and_streamed(proxy: RunningProxy) -> None:
    pids_before = proxy.health()["slot"]["pid"]
    answer = proxy.chat(SMOL, max_tokens=8)
    assert answer.status_code == 200
    body = answer.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    payload = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "ping"}],
        "max_tokens": 8,
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=payload, timeout=120
    ) as response:
        assert response.status_code == 200
        data = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert any(c["choices"][0]["delta"].get("content") for c in chunks if c["choices"])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # llama-server also answers without `/v1`, for clients that append the path to the base.
    bare = post(proxy.url, "/chat/completions", {**payload, "stream": False})
    assert bare.status_code == 200
    assert bare.json()["choices"][0]["message"]["content"]
    assert proxy.health()["slot"]["pid"] == pids_before  # the loaded process served them all


def test_router_load_of_another_model_swaps_one_process_for_the_other(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    [smol_pid] = processes_listening_on(workspace.model_port)
    answer = post(proxy.url, "/models/load", {"model": GEMMA})
    assert answer.status_code == 200
    assert answer.json() == {"success": True}
    now = statuses(proxy.url)
    assert now[GEMMA] == {"value": "loaded"}
    assert now[SMOL] == {"value": "unloaded"}
    assert not pid_alive(smol_pid)
    assert len(processes_listening_on(workspace.model_port)) == 1


def test_router_unload_of_a_model_not_loaded_is_llama_cpps_400(proxy: RunningProxy) -> None:
    answer = post(proxy.url, "/models/unload", {"model": SMOL})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["message"] == "model is not running"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "model"
    assert statuses(proxy.url)[GEMMA] == {"value": "loaded"}


def test_router_unload_stops_the_process(proxy: RunningProxy, workspace: Workspace) -> None:
    [gemma_pid] = processes_listening_on(workspace.model_port)
    with EventLog(proxy.url) as log:
        answer = post(proxy.url, "/models/unload", {"model": GEMMA})
        log.wait_for(GEMMA, "unloaded")
    assert answer.status_code == 200
    assert answer.json() == {"success": True}
    assert log.statuses_of(GEMMA) == ["loaded", "unloaded"]
    assert statuses(proxy.url)[GEMMA] == {"value": "unloaded"}
    assert statuses(proxy.url, "/v1/models")[GEMMA] == {"value": "unloaded"}
    assert not pid_alive(gemma_pid)
    assert processes_listening_on(workspace.model_port) == []


def test_router_unknown_model_is_an_openai_404(proxy: RunningProxy) -> None:
    for path in ("/models/load", "/models/unload"):
        answer = post(proxy.url, path, {"model": "no such model"})
        assert answer.status_code == 404
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == "model"
        assert "no such model" in error["message"]


@pytest.mark.parametrize("body", [{}, {"model": 7}, {"model": ""}, ["model"], "model"])
def test_router_body_without_a_model_is_a_400_naming_it(proxy: RunningProxy, body: Any) -> None:
    for path in ("/models/load", "/models/unload"):
        answer = post(proxy.url, path, body)
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "model"


def test_router_load_from_a_hostile_page_is_refused(
    proxy: RunningProxy, workspace: Workspace
) -> None:
    # What a page on another origin can send without a preflight: a text/plain POST, which the
    # browser sends with its Origin; and the JSON one (after a preflight that is refused too).
    hostile = "http://cute-cats.example"
    simple = httpx.post(
        f"{proxy.url}/models/load",
        content=json.dumps({"model": SMOL}),
        headers={"Origin": hostile, "Content-Type": "text/plain"},
        timeout=30,
    )
    as_json = post(proxy.url, "/models/load", {"model": SMOL}, Origin=hostile)
    preflight = httpx.options(
        f"{proxy.url}/models/load",
        headers={"Origin": hostile, "Access-Control-Request-Method": "POST"},
        timeout=30,
    )
    for refused in (simple, as_json, preflight):
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "origin_not_allowed"
    assert statuses(proxy.url)[SMOL] == {"value": "unloaded"}
    assert processes_listening_on(workspace.model_port) == []


def test_router_sse_sends_heartbeats_and_ends_when_the_proxy_stops(
    tmp_path: Path, demo_models: Path
) -> None:
    make_demo_workspace(tmp_path, demo_models)
    ws = Workspace(tmp_path, extra_env={"CHAT_PROXY_STREAM_HEARTBEAT_S": "0.2"})
    running = ws.start_proxy()
    try:
        with httpx.stream("GET", f"{running.url}/models/sse", timeout=60) as response:
            lines = response.iter_lines()
            comments = 0
            while comments < 3:  # the opening comment, then heartbeats
                if next(lines).startswith(":"):
                    comments += 1
            code: list[int] = []
            stopper = threading.Thread(target=lambda: code.append(running.terminate()))
            stopper.start()
            rest = list(lines)  # returns once the proxy ends the stream
            stopper.join(timeout=60)
        assert all(line.startswith(":") or not line for line in rest)
        assert code in ([0], [-signal.SIGTERM])
        # The stream ended by itself: uvicorn did not have to cut it off at its graceful timeout.
        assert "timeout graceful shutdown exceeded" not in (tmp_path / "proxy.out").read_text()
    finally:
        if running.process.poll() is None:
            running.kill()
        ws.kill_model_servers()


def test_router_failed_start_is_a_503_and_shows_failed(tmp_path: Path, demo_models: Path) -> None:
    make_demo_workspace(tmp_path, demo_models)
    ws = Workspace(tmp_path)
    serve_through(ws, FAILING_SERVER)
    with ws.serving() as running, EventLog(running.url) as log:
        answer = post(running.url, "/models/load", {"model": SMOL})
        log.wait_for(SMOL, "unloaded")
        deadline = time.monotonic() + 30
        while not any(e["data"].get("failed") for e in log.events if e["model"] == SMOL):
            assert time.monotonic() < deadline, f"no failed event: {log.events}"
            time.sleep(0.05)
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["type"] == "backend_error"
        assert SMOL.split()[0] in error["message"]
        status = statuses(running.url)[SMOL]
        assert status["value"] == "unloaded"
        assert status["failed"] is True
        assert status["error"]
        assert statuses(running.url, "/v1/models")[SMOL] == status
        failed = [e["data"] for e in log.events if e["model"] == SMOL and e["data"].get("failed")]
        assert failed[-1]["status"] == "unloaded"
        assert failed[-1]["error"] == status["error"]
    assert processes_listening_on(ws.model_port) == []


def test_router_paths_need_an_api_key_as_v1_does(tmp_path: Path, demo_models: Path) -> None:
    make_demo_workspace(tmp_path, demo_models)
    ws = Workspace(tmp_path, extra_env={"CHAT_PROXY_API_KEYS": "user-key"})
    with ws.serving() as running:
        for path in ("/models", "/v1/models", "/models/sse"):
            refused = httpx.get(running.url + path, timeout=10)
            assert refused.status_code == 401, path
            assert refused.json()["error"]["code"] == "invalid_api_key"
        for path in ("/models/load", "/models/unload"):
            refused = post(running.url, path, {"model": SMOL})
            assert refused.status_code == 401, path
        key = {"Authorization": "Bearer user-key"}
        listed = httpx.get(f"{running.url}/models", headers=key, timeout=10)
        assert listed.status_code == 200
        assert {item["status"]["value"] for item in listed.json()["data"]} == {"unloaded"}
        unload = post(running.url, "/models/unload", {"model": SMOL}, **key)
        assert unload.status_code == 400  # admitted: the user key suffices, it is not admin
        assert unload.json()["error"]["message"] == "model is not running"
    assert processes_listening_on(ws.model_port) == []
