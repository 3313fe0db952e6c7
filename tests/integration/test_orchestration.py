"""The GPU slot with real llama.cpp processes, the state file, the loader's activate-model /
current-model, and Ollama coordination (fake Ollama), through the real console scripts."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime
from typing import Any

import httpx
import pytest

from conftest import read_json, write_json
from support.fake_ollama import FakeOllama, dead_url
from support.proxy_process import Workspace, free_port, pid_alive, processes_listening_on

pytestmark = pytest.mark.timeout(300)

SMOL = "smollm2 135m (Q4 1)"
GEMMA = "gemma3 270m (Q4 K M)"
SMOL_ENTRY = "smollm2_135m_(Q4_1)"
GEMMA_ENTRY = "gemma3_270m_(Q4_K_M)"


def add_entries(ws: Workspace, *entries: dict[str, Any]) -> None:
    path = ws.root / "configs" / "model_registry.curated.json"
    write_json(path, [*read_json(path), *entries])


def add_broken_entry(ws: Workspace) -> None:
    """An entry named `broken` whose "model" llama.cpp cannot load."""
    (ws.root / "models" / "junk.gguf").write_bytes(b"this is not a model")
    add_entries(
        ws,
        {
            "name": "broken",
            "backend": "llamacpp",
            "download_path": "../models/junk.gguf",
            "chat_template": {"name": "chatml"},
        },
    )


def wait_dead(pid: int) -> None:
    deadline = time.monotonic() + 30
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} is still alive"
        time.sleep(0.05)


def test_loader_activate_current_and_stop_without_a_proxy(ws: Workspace) -> None:
    started = ws.loader("activate-model", SMOL, "--json")
    assert started.returncode == 0, started.stderr
    state = json.loads(started.stdout)
    assert state["entry"] == SMOL_ENTRY
    assert state["owner"] == "loader"
    assert state["port"] == ws.model_port
    assert pid_alive(state["pid"])

    current = json.loads(ws.loader("current-model", "--json").stdout)
    assert current["pid"] == state["pid"]

    swapped = json.loads(ws.loader("activate-model", GEMMA, "--json").stdout)
    assert swapped["entry"] == GEMMA_ENTRY
    assert not pid_alive(state["pid"])
    assert processes_listening_on(ws.model_port) == [swapped["pid"]]

    stopped = ws.loader("activate-model", "--stop")
    assert stopped.returncode == 0
    assert GEMMA_ENTRY in stopped.stdout
    assert not pid_alive(swapped["pid"])
    assert json.loads(ws.loader("current-model", "--json").stdout) is None


def test_loader_refuses_entries_it_cannot_start(ws: Workspace) -> None:
    result = ws.loader("activate-model", "qwen3 8b (Q4 K M)")  # an Ollama entry
    assert result.returncode == 1
    assert "ollama" in result.stderr
    assert "Traceback" not in result.stderr


def test_proxy_adopts_a_model_the_loader_started(ws: Workspace) -> None:
    state = json.loads(ws.loader("activate-model", SMOL, "--json").stdout)
    proxy = ws.start_proxy()
    try:
        deadline = time.monotonic() + 30
        while (slot := proxy.health()["slot"])["state"] != "ready":  # its health is checked
            assert time.monotonic() < deadline, slot
            time.sleep(0.05)
        assert slot["holder"] == SMOL_ENTRY
        assert slot["pid"] == state["pid"]

        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        slot = proxy.health()["slot"]
        assert slot["pid"] == state["pid"]
        assert slot["swaps"] == 0  # no second start
        assert processes_listening_on(ws.model_port) == [state["pid"]]

        via_proxy = json.loads(ws.loader("current-model", "--json").stdout)
        assert via_proxy["proxy"] == proxy.url
        assert via_proxy["slot"]["holder"] == SMOL_ENTRY

        assert ws.loader("activate-model", GEMMA).returncode == 0  # through the proxy's slot
        assert proxy.health()["slot"]["holder"] == GEMMA_ENTRY
        assert not pid_alive(state["pid"])
        gemma_pid = proxy.health()["slot"]["pid"]
    finally:
        proxy.terminate()
    assert not pid_alive(gemma_pid)
    assert json.loads(ws.loader("current-model", "--json").stdout) is None


def test_restarted_proxy_adopts_the_live_process(ws: Workspace) -> None:
    first = ws.start_proxy()
    assert first.chat(SMOL, max_tokens=4).status_code == 200
    pid = first.health()["slot"]["pid"]
    first.kill()  # SIGKILL: no shutdown, the model process keeps running
    assert pid_alive(pid)

    second = ws.start_proxy()
    try:
        deadline = time.monotonic() + 30
        while (slot := second.health()["slot"])["state"] != "ready":  # its health is checked
            assert time.monotonic() < deadline, slot
            time.sleep(0.05)
        assert slot["holder"] == SMOL_ENTRY
        assert slot["pid"] == pid
        assert second.chat(SMOL, max_tokens=4).status_code == 200
        assert second.health()["slot"]["swaps"] == 0
        assert processes_listening_on(ws.model_port) == [pid]  # no orphan, no second start
    finally:
        second.terminate()
    assert not pid_alive(pid)


def test_killed_model_process_is_restarted_by_the_next_request(ws: Workspace) -> None:
    proxy = ws.start_proxy()
    try:
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        pid = proxy.health()["slot"]["pid"]
        os.killpg(pid, signal.SIGKILL)
        wait_dead(pid)
        response = proxy.chat(SMOL, max_tokens=4)
        assert response.status_code == 200
        new_pid = proxy.health()["slot"]["pid"]
        assert new_pid != pid
        assert pid_alive(new_pid)
    finally:
        proxy.terminate()


def test_corrupt_state_file_is_moved_aside(ws: Workspace) -> None:
    state = ws.root / "_staging" / "active_vllm.json"
    state.parent.mkdir()
    state.write_text("{ this is not json")
    proxy = ws.start_proxy()
    try:
        assert proxy.health()["slot"]["holder"] is None
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
    finally:
        proxy.terminate()
    aside = list(state.parent.glob("active_vllm.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_text() == "{ this is not json"
    assert "corrupt" in (ws.root / "proxy.out").read_text()


def test_start_failure_is_503_with_the_log_tail_and_an_empty_slot(ws: Workspace) -> None:
    add_broken_entry(ws)
    proxy = ws.start_proxy()
    try:
        for _attempt in range(2):  # a failed start does not stick: the next request tries again
            response = proxy.chat("broken", max_tokens=4)
            assert response.status_code == 503
            error = response.json()["error"]
            assert "broken could not be started" in error["message"]
            assert "junk.gguf" in error["message"]  # the backend's own words, from its log
        slot = proxy.health()["slot"]
        assert slot["holder"] is None
        assert "broken" in slot["last_error"]
        starts = [e for e in slot["history"] if e["event"] == "starting"]
        assert len(starts) == 2
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200  # the slot still works
    finally:
        proxy.terminate()


def test_start_slower_than_the_timeout_is_503_and_leaves_nothing(ws: Workspace) -> None:
    ws.extra_env["CHAT_PROXY_VLLM_START_TIMEOUT_S"] = "0.2"
    proxy = ws.start_proxy()
    try:
        response = proxy.chat(SMOL, max_tokens=4)
        assert response.status_code == 503
        assert "did not become ready within 0.2 s" in response.json()["error"]["message"]
        assert proxy.health()["slot"]["holder"] is None
        assert processes_listening_on(ws.model_port) == []
    finally:
        proxy.terminate()


def test_concurrent_clients_alternating_models_all_succeed_without_overlap(
    ws: Workspace,
) -> None:
    clients, rounds = 8, 3
    proxy = ws.start_proxy()
    statuses: list[int] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        for turn in range(rounds):
            model = (SMOL, GEMMA)[(number + turn) % 2]
            status = proxy.chat(model, max_tokens=4).status_code
            with lock:
                statuses.append(status)

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=280)
        slot = proxy.health()["slot"]
    finally:
        proxy.terminate()

    assert statuses == [200] * (clients * rounds)
    running: set[str] = set()
    for event in slot["history"]:  # at most one holder at any moment
        if event["event"] == "starting":
            assert running == set(), f"{event['model']} started while {running} ran"
        elif event["event"] == "ready":
            running.add(event["model"])
        elif event["event"] == "stopped":
            running.discard(event["model"])
    # Requests for the same model are served in batches: one swap per batch at most, where a
    # batch is a run of requests for one model in the order they finished (the request log).
    records = [
        json.loads(line)
        for line in (ws.root / "logs" / "chat_proxy.jsonl").read_text().splitlines()
    ]
    assert len(records) == clients * rounds
    finished = sorted(records, key=_end_time)
    batches = 1 + sum(
        1 for a, b in itertools.pairwise(finished) if a["model_resolved"] != b["model_resolved"]
    )
    assert slot["swaps"] <= batches
    assert batches < clients * rounds  # batching happened: not one swap per request


def _end_time(record: dict[str, Any]) -> float:
    started = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
    return started + record["latency_ms"] / 1000


def test_ollama_and_model_servers_take_turns_on_the_gpu(ws: Workspace) -> None:
    with FakeOllama(installed=["qwen3:8b"]) as ollama:
        ws.extra_env["IMAGEWORKS_OLLAMA_HOST"] = ollama.url
        add_entries(
            ws,
            {
                "name": "qwen3-local",
                "backend": "ollama",
                "served_model_id": "qwen3:8b",
                "capabilities": {"tools": True},
            },
        )
        proxy = ws.start_proxy()
        try:
            assert proxy.chat("qwen3-local").status_code == 200
            assert ollama.loaded == {"qwen3:8b"}

            assert proxy.chat(SMOL, max_tokens=4).status_code == 200  # Ollama -> model server
            assert ollama.unload_requests == ["qwen3:8b"]
            assert ollama.loaded == set()
            history = [(e["event"], e["model"]) for e in proxy.health()["slot"]["history"]]
            assert history.index(("stopped", f"@ollama {ollama.url}")) < history.index(
                ("starting", SMOL_ENTRY)
            )
            pid = proxy.health()["slot"]["pid"]

            assert proxy.chat("qwen3-local").status_code == 200  # model server -> Ollama
            assert not pid_alive(pid)
            assert processes_listening_on(ws.model_port) == []
            assert ollama.loaded == {"qwen3:8b"}
        finally:
            proxy.terminate()


def test_ollama_down_is_503_for_ollama_entries_only(ws: Workspace) -> None:
    ws.extra_env["IMAGEWORKS_OLLAMA_HOST"] = dead_url()
    add_entries(ws, {"name": "qwen3-local", "backend": "ollama", "served_model_id": "qwen3:8b"})
    proxy = ws.start_proxy()
    try:
        response = proxy.chat("qwen3-local")
        assert response.status_code == 503
        assert "Ollama" in response.json()["error"]["message"]
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200  # not blocked by Ollama
    finally:
        proxy.terminate()


def test_leave_model_running_at_shutdown_for_the_next_proxy(ws: Workspace) -> None:
    ws.extra_env["CHAT_PROXY_LEAVE_MODEL_RUNNING"] = "1"
    first = ws.start_proxy()
    assert first.chat(SMOL, max_tokens=4).status_code == 200
    pid = first.health()["slot"]["pid"]
    first.terminate()
    assert pid_alive(pid)
    ws.extra_env.pop("CHAT_PROXY_LEAVE_MODEL_RUNNING")
    second = ws.start_proxy()
    try:
        assert second.health()["slot"]["pid"] == pid
    finally:
        second.terminate()
    assert not pid_alive(pid)


UPSTREAM_SCRIPT = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        message = {"role": "assistant", "content": "autostarted"}
        self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "tiny",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_autostart_runs_the_command_for_a_down_external_backend(ws: Workspace) -> None:
    port = free_port()
    add_entries(
        ws,
        {
            "name": "tiny-remote",
            "backend": "external",
            "served_model_id": "tiny",
            "backend_config": {"base_url": f"http://127.0.0.1:{port}/v1"},
        },
    )
    ws.extra_env["CHAT_PROXY_AUTOSTART_ENABLED"] = "1"
    ws.extra_env["CHAT_PROXY_AUTOSTART_MAP"] = json.dumps(
        {"tiny-remote": [sys.executable, "-c", UPSTREAM_SCRIPT, str(port)]}
    )
    proxy = ws.start_proxy()
    try:
        response = proxy.chat("tiny-remote")
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "autostarted"
    finally:
        proxy.terminate()
    with pytest.raises(httpx.HTTPError):  # stopped with the proxy
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)


def test_requests_arriving_mid_swap_wait_and_succeed(ws: Workspace) -> None:
    proxy = ws.start_proxy()
    results: dict[str, int] = {}

    def ask(tag: str, model: str) -> None:
        results[tag] = proxy.chat(model, max_tokens=4).status_code

    try:
        first = threading.Thread(target=ask, args=("first", SMOL))
        first.start()
        deadline = time.monotonic() + 60
        while proxy.health()["slot"]["state"] != "starting":
            assert time.monotonic() < deadline, "never saw the model loading"
            time.sleep(0.01)
        latecomers = [
            threading.Thread(target=ask, args=("same", SMOL)),
            threading.Thread(target=ask, args=("other", GEMMA)),
        ]
        for thread in latecomers:
            thread.start()
        for thread in [first, *latecomers]:
            thread.join(timeout=120)
    finally:
        proxy.terminate()
    assert results == {"first": 200, "same": 200, "other": 200}


def test_drain_timeout_cuts_a_long_request_with_a_clear_error(ws: Workspace) -> None:
    ws.extra_env["CHAT_PROXY_DRAIN_TIMEOUT_S"] = "1"
    ws.extra_env["CHAT_PROXY_VLLM_STOP_TIMEOUT_S"] = "1"  # llama.cpp finishes generating on TERM
    proxy = ws.start_proxy()
    events: list[str] = []

    def long_stream() -> None:
        payload = {
            "model": GEMMA,  # a base model: it keeps going until max_tokens
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 900,
            "stream": True,
        }
        with httpx.stream(
            "POST", f"{proxy.url}/v1/chat/completions", json=payload, timeout=120
        ) as response:
            events.extend(line for line in response.iter_lines() if line.startswith("data:"))

    try:
        streamer = threading.Thread(target=long_stream)
        streamer.start()
        deadline = time.monotonic() + 60
        while len(events) < 3:  # the long answer is under way
            assert time.monotonic() < deadline
            assert streamer.is_alive()
            time.sleep(0.01)
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200  # waited 1 s, then swapped
        streamer.join(timeout=60)
    finally:
        proxy.terminate()
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][5:])["error"]
    assert error["code"] == "model_swapped_out"
    assert "drain timeout" in error["message"]


def stream_lines(proxy_url: str, model: str) -> tuple[int, list[str]]:
    payload = {"model": model, "messages": [{"role": "user", "content": "ping"}], "stream": True}
    payload["max_tokens"] = 4
    with httpx.stream(
        "POST", f"{proxy_url}/v1/chat/completions", json=payload, timeout=120
    ) as response:
        return response.status_code, [line for line in response.iter_lines() if line]


def test_streams_get_loading_heartbeats_while_the_model_starts(ws: Workspace) -> None:
    ws.extra_env["CHAT_PROXY_STREAM_HEARTBEAT_S"] = "0.1"
    proxy = ws.start_proxy()
    try:
        status, lines = stream_lines(proxy.url, SMOL)
        assert status == 200
        loading = [line for line in lines if line.startswith(": loading")]
        assert loading
        assert SMOL_ENTRY in loading[0]
        data = [line for line in lines if line.startswith("data:")]
        assert data[-1] == "data: [DONE]"
        assert any('"content"' in line for line in data)

        status, lines = stream_lines(proxy.url, SMOL)  # loaded now: no heartbeat needed
        assert not [line for line in lines if line.startswith(": loading")]
    finally:
        proxy.terminate()


def test_a_start_failure_after_heartbeats_is_an_error_event(ws: Workspace) -> None:
    add_broken_entry(ws)
    ws.extra_env["CHAT_PROXY_STREAM_HEARTBEAT_S"] = "0.05"
    proxy = ws.start_proxy()
    try:
        status, lines = stream_lines(proxy.url, "broken")
    finally:
        proxy.terminate()
    assert status == 200  # the headers went out with the first heartbeat
    assert lines[0].startswith(": loading")
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][5:])["error"]
    assert "broken could not be started" in error["message"]


def test_a_client_leaving_during_the_load_leaves_the_slot_usable(ws: Workspace) -> None:
    ws.extra_env["CHAT_PROXY_STREAM_HEARTBEAT_S"] = "0.05"
    proxy = ws.start_proxy()
    try:
        payload = {"model": SMOL, "messages": [{"role": "user", "content": "ping"}], "stream": True}
        with httpx.stream(
            "POST", f"{proxy.url}/v1/chat/completions", json=payload, timeout=60
        ) as response:
            first = next(line for line in response.iter_lines() if line)
            assert first.startswith(": loading")
        # gone mid-load: the next request is served and nothing stays leased
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        deadline = time.monotonic() + 10
        while proxy.health()["slot"]["active_requests"] != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proxy.terminate()
