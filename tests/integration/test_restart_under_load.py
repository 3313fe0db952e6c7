"""`POST /v1/admin/restart`, again and again, under clients that chat without a pause, each on
one kept-alive connection (httpx's pool, as an SDK uses it): every request gets a whole answer.

A restart meets each kept-alive connection in one of three states: a request in progress, an
answer just sent and the next request on its way (in the network, in the socket's buffer, half
parsed), or idle. None of them may end in a reset or a 5xx: what the drain accepted it answers
(the model still up), with `Connection: close`, and the client's next connection waits in the
backlog for the new program. A stop (SIGTERM) under the same clients still ends promptly, and
then refuses connections.

    pytest tests/integration/test_restart_under_load.py                      # a few restarts
    pytest tests/integration/test_restart_under_load.py --restart-rounds 40  # many more
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from support.proxy_process import RunningProxy, Workspace
from support.restarts import overview, restart, wait_for_new_boot

pytestmark = pytest.mark.integration

SMOL = "smollm2 135m (Q4 1)"
# Answers each client gets from a boot before it is restarted, and from the new one after.
ANSWERS_PER_BOOT = 3


@dataclass
class Answer:
    """One request as its client saw it: whole, or what went wrong."""

    stream: bool
    started: float
    finished: float = 0.0
    problem: str | None = None
    closes: bool = False  # the answer carried `Connection: close`

    @property
    def kind(self) -> str:
        return "stream" if self.stream else "whole answer"


@dataclass
class KeptAliveClient:
    """A client sending request after request on one pooled connection (a new one only when
    the server closes it), until told to stop."""

    url: str
    stream: bool
    stop: threading.Event
    answers: list[Answer] = field(default_factory=list)

    def run(self) -> None:
        body = {
            "model": SMOL,
            "messages": [{"role": "user", "content": "Count from one to twenty."}],
            "max_tokens": 8,
            "stream": self.stream,
        }
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                answer = Answer(self.stream, time.monotonic())
                self.answers.append(answer)
                try:
                    answer.closes, answer.problem = _send(client, self.url, body)
                except httpx.HTTPError as exc:  # a reset, a close without an answer, a timeout
                    answer.problem = f"{type(exc).__name__}: {exc}"
                answer.finished = time.monotonic()
                if answer.problem is not None:
                    self.stop.wait(0.05)  # e.g. refused by a stopped proxy: not a busy loop

    def answered_since(self, moment: float) -> int:
        return sum(1 for a in list(self.answers) if a.started > moment and a.finished)


def _send(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[bool, str | None]:
    """(whether the answer said `Connection: close`, what was wrong with it if anything)."""
    endpoint = f"{url}/v1/chat/completions"
    with client.stream("POST", endpoint, json=body) as response:
        closes = response.headers.get("connection", "").lower() == "close"
        if response.status_code != 200:
            return closes, f"{response.status_code}: {response.read()[:300]!r}"
        if not body["stream"]:
            choices = json.loads(response.read())["choices"]
            finish = choices[0]["finish_reason"]
            return closes, None if finish in ("stop", "length") else f"finish_reason {finish}"
        last = None
        for line in response.iter_lines():
            if line.startswith("data: {") and "error" in json.loads(line[6:]):
                return closes, f"error event: {line[:300]}"
            if line:
                last = line
    return closes, None if last == "data: [DONE]" else f"stream ended with {last!r}"


@dataclass
class Load:
    """The three clients: two wanting whole answers, one streams."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    clients: list[KeptAliveClient] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        streams = (False, False, True)
        self.clients = [KeptAliveClient(self.url, stream, self.stop) for stream in streams]
        self.threads = [threading.Thread(target=c.run, daemon=True) for c in self.clients]
        for thread in self.threads:
            thread.start()

    def finish(self) -> list[Answer]:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        return [answer for client in self.clients for answer in client.answers]

    def wait_for_answers(self, since: float, proxy: RunningProxy) -> None:
        """Until every client has been answered ANSWERS_PER_BOOT times since `since`."""
        deadline = time.monotonic() + 120
        while not all(c.answered_since(since) >= ANSWERS_PER_BOOT for c in self.clients):
            assert proxy.process.poll() is None, (proxy.workdir / "proxy.out").read_text()
            if time.monotonic() > deadline:
                now = time.monotonic()
                waiting = [
                    f"{c.answers[-1].kind} for {now - c.answers[-1].started:.0f} s"
                    for c in self.clients
                ]
                raise AssertionError(f"clients still waiting {now - since:.0f} s after: {waiting}")
            time.sleep(0.02)


def test_restart_under_kept_alive_load_answers_every_request_whole(
    ws: Workspace, restart_rounds: int, restart_summary: Callable[[str], None]
) -> None:
    proxy = ws.start_proxy()
    load = Load(proxy.url)
    restarts = 0
    try:
        boot = overview(proxy)["proxy"]["boot_id"]
        load.start()
        booted = time.monotonic()
        for _ in range(restart_rounds):
            load.wait_for_answers(booted, proxy)
            restart(proxy)
            restarts += 1
            boot = wait_for_new_boot(proxy, boot)["proxy"]["boot_id"]
            booted = time.monotonic()
        load.wait_for_answers(booted, proxy)
    finally:
        answers = load.finish()
        returned = proxy.terminate()
    problems = [f"{a.kind}: {a.problem}" for a in answers if a.problem is not None]
    restart_summary(
        f"{len(answers)} requests over {restarts} restarts: {len(problems)} lost, "
        f"{sum(a.closes for a in answers)} answered with Connection: close"
    )
    assert problems == [], problems
    assert restarts == restart_rounds
    assert returned in (0, -signal.SIGTERM)
    # The connections were kept alive until a drain told their clients it was closing them.
    assert any(a.closes for a in answers)


@pytest.mark.timeout(240)
def test_stop_under_kept_alive_load_ends_promptly_and_then_refuses_connections(
    ws: Workspace,
) -> None:
    proxy = ws.start_proxy()
    load = Load(proxy.url)
    try:
        load.start()
        load.wait_for_answers(time.monotonic(), proxy)
        stopped_at = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)
        returned = proxy.process.wait(timeout=60)
        took = time.monotonic() - stopped_at
    finally:
        answers = load.finish()
        if proxy.process.poll() is None:
            proxy.kill()
    assert returned in (0, -signal.SIGTERM)
    assert took < 20, took  # the drain's quiet second, not a keep-alive or graceful timeout
    with pytest.raises(httpx.ConnectError):
        proxy.health()  # a stop hands the socket to nobody: refused, not queued
    # Each request was answered (the ones that came during the stop may be told 503), or
    # found the proxy gone (refused); none was reset or cut short.
    refused = "ConnectError"
    problems = [
        a.problem for a in answers if a.problem and not a.problem.startswith(("503", refused))
    ]
    assert problems == [], problems
