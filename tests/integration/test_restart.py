"""`POST /v1/admin/restart` and `/v1/admin/reload` on the real console script and real
llama.cpp: a restart drains what was accepted, hands the listening socket to the new program
(clients that connect meanwhile wait instead of being refused), and stops or hands over the
model; `exit` mode ends the process cleanly for Docker or systemd."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from imageworks.backends.llamacpp import find_llama_server
from support.model_servers import SLOW_START, serve_through
from support.proxy_process import Workspace, pid_alive, processes_listening_on
from support.restarts import overview, restart, wait_for_new_boot

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SMOL = "smollm2 135m (Q4 1)"
SMOL_ENTRY = "smollm2_135m_(Q4_1)"
JSON = {"Content-Type": "application/json"}


@dataclass
class Answer:
    """What one client received, judged whole: a complete answer or a failure."""

    stream: bool
    started: float
    finished: float = 0.0
    complete: bool = False
    problem: str | None = None


@dataclass
class Load:
    """Clients chatting in a loop, each request on a new connection (so a restart's only way
    to lose one would be to refuse or drop a connection), until told to stop."""

    url: str
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, clients: int) -> None:
        for number in range(clients):
            thread = threading.Thread(target=self._chat, args=(number % 2 == 0,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=180)

    def in_flight(self) -> int:
        return sum(1 for answer in list(self.answers) if not answer.finished)

    def _chat(self, stream: bool) -> None:
        body = {
            "model": SMOL,
            "messages": [{"role": "user", "content": "Count from one to twenty."}],
            "max_tokens": 24,
            "stream": stream,
        }
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=120, limits=limits) as client:
            while not self.stop.is_set():
                answer = Answer(stream, time.monotonic())
                self.answers.append(answer)
                try:
                    answer.complete, answer.problem = _send(client, self.url, body)
                except httpx.HTTPError as exc:
                    answer.problem = f"{type(exc).__name__}: {exc}"
                answer.finished = time.monotonic()


def _send(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[bool, str | None]:
    endpoint = f"{url}/v1/chat/completions"
    if not body["stream"]:
        response = client.post(endpoint, json=body)
        if response.status_code != 200:
            return False, f"{response.status_code}: {response.text[:200]}"
        choice = response.json()["choices"][0]
        return choice["finish_reason"] in ("stop", "length"), None
    finish, done = None, False
    with client.stream("POST", endpoint, json=body) as response:
        if response.status_code != 200:
            return False, f"{response.status_code}: {response.read()[:200]!r}"
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    return False, f"error event: {event['error']}"
                finish = (
                    event["choices"][0].get("finish_reason") or finish
                    if event["choices"]
                    else finish
                )
    return done and finish in ("stop", "length"), None if done else "stream ended without [DONE]"


def test_restart_under_load_answers_every_accepted_request_and_refuses_no_connection(
    ws: Workspace,
) -> None:
    proxy = ws.start_proxy()
    try:
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200  # the model is loaded
        first = overview(proxy)
        old_model_pids = processes_listening_on(ws.model_port)
        assert len(old_model_pids) == 1
        load = Load(proxy.url)
        load.start(clients=4)
        deadline = time.monotonic() + 60
        while load.in_flight() < 3 and time.monotonic() < deadline:  # several mid-answer
            time.sleep(0.02)
        restarted_at = time.monotonic()
        restart(proxy)
        back = wait_for_new_boot(proxy, first["proxy"]["boot_id"])
        # Keep chatting until every client has been answered by the new proxy too.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            after = [a for a in list(load.answers) if a.started > restarted_at and a.finished]
            if len(after) >= 8:
                break
            time.sleep(0.1)
        load.finish()
        answers = list(load.answers)
        problems = [a.problem for a in answers if a.problem or not a.complete]
        assert problems == [], problems
        in_flight_at_restart = [a for a in answers if a.started < restarted_at < a.finished]
        assert len(in_flight_at_restart) >= 3  # the drain answered them
        assert any(a.stream for a in in_flight_at_restart)
        assert len([a for a in answers if a.started > restarted_at]) >= 8
        # The same process (exec), a new program; the old model was stopped, a new one serves.
        assert proxy.process.poll() is None
        assert back["proxy"]["pid"] == first["proxy"]["pid"] == proxy.process.pid
        assert all(not pid_alive(pid) for pid in old_model_pids)
        assert len(processes_listening_on(ws.model_port)) == 1
        log = (ws.root / "proxy.out").read_text()
        assert "restart requested (exec)" in log
        assert log.count("Application startup complete") == 2
    finally:
        assert proxy.terminate() in (0, -signal.SIGTERM)
    assert processes_listening_on(ws.model_port) == []


def test_restart_while_a_model_starts_serves_the_request_waiting_for_it(ws: Workspace) -> None:
    server = find_llama_server(None).binary
    assert server is not None, "llama-server is part of the demo dependencies"
    serve_through(ws, SLOW_START.format(delay=2, server=server))
    proxy = ws.start_proxy()
    try:
        boot = overview(proxy)["proxy"]["boot_id"]
        answers: list[httpx.Response] = []
        waiting = threading.Thread(target=lambda: answers.append(proxy.chat(SMOL, max_tokens=4)))
        waiting.start()
        deadline = time.monotonic() + 30
        while overview(proxy)["slot"]["state"] != "starting":
            assert time.monotonic() < deadline, "the model never started"
            time.sleep(0.05)
        restart(proxy)
        waiting.join(timeout=120)
        [answer] = answers
        assert answer.status_code == 200, answer.text  # accepted before the restart: served
        assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length")
        wait_for_new_boot(proxy, boot)
        assert processes_listening_on(ws.model_port) == []  # stopped by the restart
    finally:
        proxy.terminate()


def test_restart_with_the_model_left_running_hands_it_to_the_new_proxy(ws: Workspace) -> None:
    ws.extra_env["CHAT_PROXY_LEAVE_MODEL_RUNNING"] = "1"
    proxy = ws.start_proxy()
    try:
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        boot = overview(proxy)["proxy"]["boot_id"]
        [model_pid] = processes_listening_on(ws.model_port)
        restart(proxy)
        back = wait_for_new_boot(proxy, boot)
        assert back["slot"]["history"][0]["event"] == "adopted"
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        assert processes_listening_on(ws.model_port) == [model_pid]  # no second start
        assert overview(proxy)["slot"]["pid"] == model_pid
    finally:
        proxy.terminate()
        for pid in processes_listening_on(ws.model_port):
            os.killpg(pid, signal.SIGTERM)


def test_restart_in_exit_mode_finishes_the_accepted_stream_then_exits_cleanly(
    ws: Workspace,
) -> None:
    ws.extra_env["CHAT_PROXY_RESTART_MODE"] = "exit"
    proxy = ws.start_proxy()
    assert proxy.chat(SMOL, max_tokens=4).status_code == 200
    load = Load(proxy.url)
    load.start(clients=2)
    deadline = time.monotonic() + 60
    while load.in_flight() < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    restarted_at = time.monotonic()
    restart(proxy)
    assert proxy.process.wait(timeout=120) == 0
    load.finish()
    accepted = [a for a in load.answers if a.started < restarted_at]
    assert accepted
    assert all(a.complete for a in accepted), [a.problem for a in accepted]
    # Connections made after the exit are refused (nobody is left to answer them): that is
    # Docker's or systemd's cue, not a lost request.
    assert processes_listening_on(ws.model_port) == []  # the model was stopped
    assert "exiting for the supervisor" in (ws.root / "proxy.out").read_text()


def test_reload_reads_an_edited_registry_now_and_names_a_broken_one(ws: Workspace) -> None:
    proxy = ws.start_proxy()
    try:
        curated = ws.root / "configs" / "model_registry.curated.json"
        entries = json.loads(curated.read_text())
        before = httpx.post(f"{proxy.url}/v1/admin/reload", json={}, timeout=10)
        assert before.status_code == 200
        count = before.json()["entries"]
        copy = {**entries[0], "name": "smollm2-copy", "display_name": "smollm2 copy"}
        curated.write_text(json.dumps([*entries, copy]))
        after = httpx.post(f"{proxy.url}/v1/admin/reload", json={}, timeout=10)
        assert after.json()["entries"] == count + 1
        listed = [m["id"] for m in httpx.get(f"{proxy.url}/v1/models").json()["data"]]
        assert "smollm2 copy (Q4 1)" in listed  # the quantization is part of the name
        curated.write_text("[{not json")
        broken = httpx.post(f"{proxy.url}/v1/admin/reload", json={}, timeout=10)
        assert broken.status_code == 503
        assert "model_registry.curated.json" in broken.json()["error"]["message"]
        # The last good registry keeps serving.
        assert "smollm2 copy" in httpx.get(f"{proxy.url}/v1/models").text
    finally:
        proxy.terminate()


def test_overview_shows_the_models_the_slot_and_the_recent_requests(ws: Workspace) -> None:
    proxy = ws.start_proxy()
    try:
        empty = overview(proxy)
        assert empty["slot"]["state"] == "empty"
        assert empty["slot"]["activity"] == "idle"
        names = {model["id"]: model for model in empty["models"]}
        assert names[SMOL]["state"] == "idle"
        assert names[SMOL]["backend"] == "llamacpp"
        assert names[SMOL]["installed"] is True
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        seen = overview(proxy)
        assert seen["slot"]["holder"] == SMOL_ENTRY
        assert seen["slot"]["holder_since"] is not None
        assert seen["slot"]["last_swaps"][0]["model"] == SMOL_ENTRY
        assert {m["id"]: m["state"] for m in seen["models"]}[SMOL] == "active"
        [recent] = seen["requests"]["recent"]
        assert recent["status"] == 200
        assert recent["model"] == SMOL_ENTRY
        assert recent["completion_tokens"] is not None
        assert sum(bucket["requests"] for bucket in seen["requests"]["series"]) == 1
        assert seen["proxy"]["boot_id"] == empty["proxy"]["boot_id"]
    finally:
        proxy.terminate()
