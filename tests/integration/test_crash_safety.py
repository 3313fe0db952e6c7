"""The core's promises under faults, through the real console scripts and real llama.cpp:
a proxy killed at every phase of a model's life, model servers that will not stop, a state file
that cannot be written, a stranger on the model port, and requests that wait too long."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from imageworks.backends.llamacpp import find_llama_server
from support.child_processes import popen
from support.model_servers import IGNORES_SIGTERM, SLOW_START, serve_through
from support.proxy_process import (
    LOADER,
    RunningProxy,
    Workspace,
    pid_alive,
    processes_listening_on,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SMOL = "smollm2 135m (Q4 1)"
GEMMA = "gemma3 270m (Q4 K M)"
SMOL_ENTRY = "smollm2_135m_(Q4_1)"


@pytest.fixture
def real_server() -> str:
    binary = find_llama_server(None).binary
    assert binary is not None, "llama-server is part of the demo dependencies"
    return str(binary)


def state_record(ws: Workspace) -> dict[str, Any] | None:
    path = ws.root / "_staging" / "active_vllm.json"
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # not yet, or replaced as we read
        return None
    return record


def shut_down(proxy: RunningProxy) -> None:
    """SIGTERM, and a graceful shutdown (uvicorn re-raises the signal once it is done)."""
    assert proxy.terminate() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in (proxy.workdir / "proxy.out").read_text()


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def chat_in_background(proxy: RunningProxy, model: str) -> threading.Thread:
    """A request whose answer nobody reads (its proxy is about to be killed)."""

    def send() -> None:
        with contextlib.suppress(httpx.HTTPError):
            proxy.chat(model, max_tokens=4)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def test_proxy_killed_while_its_model_starts_is_adopted_by_the_next_proxy(
    ws: Workspace, real_server: str
) -> None:
    serve_through(ws, SLOW_START.format(delay=2, server=real_server))
    first = ws.start_proxy()
    chat_in_background(first, SMOL)
    record = wait_for(lambda: state_record(ws), "the state file to record the spawned process")
    assert record["phase"] == "starting"  # written before the health check
    assert record["entry"] == SMOL_ENTRY
    first.kill()  # SIGKILL while the model server is still starting
    assert pid_alive(record["pid"])

    second = ws.start_proxy()
    try:
        answer = second.chat(SMOL, max_tokens=4)
        assert answer.status_code == 200, answer.text
        assert processes_listening_on(ws.model_port) == [record["pid"]]  # adopted, no 2nd start
        assert wait_for(lambda: (state_record(ws) or {}).get("phase") == "ready", "ready")
        history = [e["event"] for e in second.health()["slot"]["history"]]
        assert history == ["adopted", "ready"]
    finally:
        shut_down(second)
    assert not pid_alive(record["pid"])


def test_proxy_stopped_while_its_model_starts_kills_the_start_and_leaves_no_record(
    ws: Workspace, real_server: str
) -> None:
    serve_through(ws, SLOW_START.format(delay=30, server=real_server))
    proxy = ws.start_proxy()
    chat_in_background(proxy, SMOL)
    record = wait_for(lambda: state_record(ws), "the spawned process's record")
    began = time.monotonic()
    shut_down(proxy)  # SIGTERM half-way through the swap: the start is cancelled, not orphaned
    assert time.monotonic() - began < 25  # the waiting request did not hold the shutdown
    assert not pid_alive(record["pid"])
    assert processes_listening_on(ws.model_port) == []
    assert state_record(ws) is None


def test_proxy_killed_while_its_model_starts_then_another_model_is_asked_for(
    ws: Workspace, real_server: str
) -> None:
    serve_through(ws, SLOW_START.format(delay=2, server=real_server))
    first = ws.start_proxy()
    chat_in_background(first, SMOL)
    record = wait_for(lambda: state_record(ws), "the spawned process's record")
    first.kill()

    second = ws.start_proxy()
    try:
        answer = second.chat(GEMMA, max_tokens=4)  # the adopted SmolLM2 must make room
        assert answer.status_code == 200, answer.text
        assert not pid_alive(record["pid"])
        assert len(processes_listening_on(ws.model_port)) == 1
    finally:
        shut_down(second)
    assert processes_listening_on(ws.model_port) == []


def test_loader_killed_while_its_model_starts_leaves_a_record_the_proxy_adopts(
    ws: Workspace, real_server: str
) -> None:
    # `activate-model` without a proxy runs the slot's own effects: the record is written as
    # the process spawns, owned by the loader, and the process outlives the command.
    serve_through(ws, SLOW_START.format(delay=2, server=real_server))
    loader = popen([str(LOADER), "activate-model", SMOL], cwd=ws.root, env=ws.env())
    try:
        record = wait_for(lambda: state_record(ws), "the loader's record of the spawned process")
    finally:
        loader.kill()
        loader.wait()
    assert (record["phase"], record["owner"]) == ("starting", "loader")
    assert pid_alive(record["pid"])

    proxy = ws.start_proxy()
    try:
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        assert processes_listening_on(ws.model_port) == [record["pid"]]
    finally:
        shut_down(proxy)
    assert not pid_alive(record["pid"])


def test_proxy_killed_while_its_model_stops_leaves_nothing_behind(
    ws: Workspace, real_server: str
) -> None:
    stubborn = IGNORES_SIGTERM.format(python=sys.executable, server=real_server)
    serve_through(ws, stubborn, CHAT_PROXY_VLLM_STOP_TIMEOUT_S="3")
    first = ws.start_proxy()
    assert first.chat(SMOL, max_tokens=4).status_code == 200
    pid = wait_for(lambda: (state_record(ws) or {}).get("pid"), "a recorded process")

    def stop_and_die() -> None:
        with contextlib.suppress(httpx.HTTPError):  # its proxy is killed before it answers
            httpx.post(f"{first.url}/v1/admin/stop", timeout=30)

    threading.Thread(target=stop_and_die, daemon=True).start()
    wait_for(lambda: (state_record(ws) or {}).get("phase") == "stopping", "phase stopping")
    first.kill()  # SIGKILL while the stop waits out SIGTERM
    assert pid_alive(pid)

    second = ws.start_proxy()  # finds a process that was being stopped: it stops it
    try:
        wait_for(lambda: not pid_alive(pid), "the stopped process to be gone", timeout_s=30)
        assert second.chat(SMOL, max_tokens=4).status_code == 200
    finally:
        shut_down(second)
    assert processes_listening_on(ws.model_port) == []
    assert state_record(ws) is None


def test_a_model_server_that_ignores_sigterm_is_killed_and_replaced(
    ws: Workspace, real_server: str
) -> None:
    stubborn = IGNORES_SIGTERM.format(python=sys.executable, server=real_server)
    serve_through(ws, stubborn, CHAT_PROXY_VLLM_STOP_TIMEOUT_S="1")
    proxy = ws.start_proxy()
    try:
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        first = processes_listening_on(ws.model_port)  # the wrapper and its llama-server
        assert proxy.chat(GEMMA, max_tokens=4).status_code == 200  # the swap needs SIGKILL
        assert all(not pid_alive(pid) for pid in first)
        leader = (state_record(ws) or {}).get("pid")
        assert {os.getpgid(pid) for pid in processes_listening_on(ws.model_port)} == {leader}
    finally:
        shut_down(proxy)
    assert processes_listening_on(ws.model_port) == []
    log = next((ws.root / "logs" / "llamacpp").glob("smollm2*.log")).read_text()
    assert "sending SIGKILL" in log


def test_a_state_file_that_cannot_be_written_fails_the_start_and_keeps_no_process(
    ws: Workspace,
) -> None:
    blocker = ws.root / "not-a-directory"
    blocker.write_text("a file where the state directory should be\n")
    ws.extra_env["CHAT_PROXY_VLLM_STATE_PATH"] = str(blocker / "active_vllm.json")
    proxy = ws.start_proxy()
    try:
        for _ in range(2):  # the second time too: no leftover holds the port
            answer = proxy.chat(SMOL, max_tokens=4)
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert "state file" in error["message"]
            assert "already in use" not in error["message"]
            assert processes_listening_on(ws.model_port) == []
        assert proxy.health()["slot"]["state"] == "empty"
    finally:
        shut_down(proxy)


def test_a_stranger_on_the_model_port_is_named_in_the_503(ws: Workspace) -> None:
    stranger = popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(ws.model_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(ws.model_port), "the stranger to listen")
        proxy = ws.start_proxy()
        try:
            answer = proxy.chat(SMOL, max_tokens=4)
            assert answer.status_code == 503
            message = answer.json()["error"]["message"]
            assert f"pid {stranger.pid}" in message
            assert "http.server" in message
            assert stranger.poll() is None  # not ours: never signalled
        finally:
            shut_down(proxy)
    finally:
        stranger.kill()
        stranger.wait()


def test_a_request_waiting_past_the_queue_timeout_gets_retry_after_and_the_start_goes_on(
    ws: Workspace, real_server: str
) -> None:
    slow = SLOW_START.format(delay=3, server=real_server)
    serve_through(ws, slow, CHAT_PROXY_QUEUE_TIMEOUT_S="1")
    proxy = ws.start_proxy()
    try:
        began = time.monotonic()
        busy = proxy.chat(SMOL, max_tokens=4)
        assert time.monotonic() - began < 3  # answered at the timeout, not after the start
        assert busy.status_code == 503
        assert busy.json()["error"]["code"] == "queue_timeout"
        assert int(busy.headers["retry-after"]) >= 1
        wait_for(lambda: proxy.health()["slot"]["state"] == "ready", "the start to finish")
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        starts = [e for e in proxy.health()["slot"]["history"] if e["event"] == "starting"]
        assert len(starts) == 1
    finally:
        shut_down(proxy)


def test_a_start_whose_only_client_left_is_stopped_rather_than_finished(
    ws: Workspace, real_server: str
) -> None:
    serve_through(ws, SLOW_START.format(delay=30, server=real_server))
    proxy = ws.start_proxy()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{proxy.url}/v1/chat/completions",
                json={"model": SMOL, "messages": [{"role": "user", "content": "hi"}]},
                timeout=httpx.Timeout(10, read=1.0),
            )
        wait_for(lambda: proxy.health()["slot"]["state"] == "empty", "the start to be cancelled")
        assert processes_listening_on(ws.model_port) == []
        assert state_record(ws) is None
        events = [e["event"] for e in proxy.health()["slot"]["history"]]
        assert events == ["starting", "cancelled"]
    finally:
        shut_down(proxy)


def test_admin_stop_happens_while_three_clients_keep_chatting(ws: Workspace) -> None:
    proxy = ws.start_proxy()
    done = threading.Event()
    statuses: list[int] = []

    def chat_in_turn() -> None:
        while not done.is_set():
            statuses.append(proxy.chat(SMOL, max_tokens=8).status_code)

    clients = [threading.Thread(target=chat_in_turn) for _ in range(3)]
    try:
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        for client in clients:
            client.start()
        time.sleep(0.5)  # let them overlap
        stopped = httpx.post(f"{proxy.url}/v1/admin/stop", timeout=60)
        assert stopped.status_code == 200
        events = [e["event"] for e in stopped.json()["slot"]["history"]]
        assert "stopped" in events
    finally:
        done.set()
        for client in clients:
            client.join(timeout=60)
        shut_down(proxy)
    assert statuses
    assert set(statuses) == {200}  # requests after the stop restarted the model


def _listening(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5)
    except httpx.HTTPError:
        return False
    return True
