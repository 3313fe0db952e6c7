"""Autostarter against real tiny servers started as its commands."""

from __future__ import annotations

import asyncio
import http.server
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest

from imageworks.backends.autostart import Autostarter
from imageworks.backends.base import BackendNotReady, Target

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

# argv: port, marker file, start delay (s). Appends its pid to the marker, then serves
# GET /v1/models like an OpenAI server (404 elsewhere).
SERVER = """
import http.server, os, sys, time
port, marker, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
with open(marker, "a") as out:
    out.write(f"{os.getpid()}\\n")
time.sleep(delay)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        found = self.path == "/v1/models"
        body = b'{"object":"list","data":[]}' if found else b""
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", port), Handler)
print("serving", flush=True)
server.serve_forever()
"""
# argv: port, marker file. Records its pid and exits with code 3.
EXIT_3 = """
import os, sys
with open(sys.argv[2], "a") as out:
    out.write(f"{os.getpid()}\\n")
print("cannot load the model", flush=True)
sys.exit(3)
"""
# argv: port, marker file. Records its pid and never serves.
NEVER_SERVES = """
import os, sys, time
with open(sys.argv[2], "a") as out:
    out.write(f"{os.getpid()}\\n")
print("still loading", flush=True)
time.sleep(600)
"""

MakeAutostarter = Callable[..., Autostarter]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def target_for(port: int) -> Target:
    return Target(base_url=f"http://127.0.0.1:{port}/v1", model="m", label="openai:m")


def started_pids(marker: Path) -> list[int]:
    if not marker.exists():
        return []
    return [int(line) for line in marker.read_text().split()]


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "starts.txt"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as http_client:
        yield http_client


@pytest.fixture
async def make_autostarter(
    client: httpx.AsyncClient, tmp_path: Path
) -> AsyncIterator[MakeAutostarter]:
    made: list[Autostarter] = []

    def make(
        commands: Mapping[str, Sequence[str] | str], grace_period_s: float = 10.0
    ) -> Autostarter:
        autostarter = Autostarter(
            commands,
            grace_period_s=grace_period_s,
            client=client,
            log_dir=tmp_path / "logs",
            stop_timeout_s=2.0,
        )
        made.append(autostarter)
        return autostarter

    yield make
    for autostarter in made:
        await autostarter.close()


def command(script: str, port: int, marker: Path, delay: float = 0.0) -> list[str]:
    return [sys.executable, "-c", script, str(port), str(marker), str(delay)]


@pytest.fixture
def running_server(port: int) -> Iterator[None]:
    """An OpenAI-ish server already listening on `port`, in this process."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield
    server.shutdown()
    server.server_close()


@pytest.mark.usefixtures("running_server")
async def test_ensure_up_backend_already_up_starts_nothing(
    make_autostarter: MakeAutostarter, port: int, marker: Path
) -> None:
    autostarter = make_autostarter({"m": command(SERVER, port, marker)})

    await autostarter.ensure_up("m", target_for(port))

    assert started_pids(marker) == []
    assert autostarter.status() == {}


async def test_ensure_up_concurrent_callers_start_the_command_once_then_reuse_it(
    make_autostarter: MakeAutostarter, port: int, marker: Path, tmp_path: Path
) -> None:
    autostarter = make_autostarter({"m": command(SERVER, port, marker, delay=0.5)})

    await asyncio.gather(*(autostarter.ensure_up("m", target_for(port)) for _ in range(5)))
    await autostarter.ensure_up("m", target_for(port))

    [pid] = started_pids(marker)
    assert autostarter.status()["m"]["pid"] == pid
    assert autostarter.status()["m"]["state"] == "ready"
    assert "serving" in (tmp_path / "logs" / "autostart" / "m.log").read_text()


async def test_ensure_up_accepts_a_command_string(
    make_autostarter: MakeAutostarter, client: httpx.AsyncClient, port: int, marker: Path
) -> None:
    autostarter = make_autostarter({"m": shlex.join(command(SERVER, port, marker))})

    await autostarter.ensure_up("m", target_for(port))

    assert len(started_pids(marker)) == 1
    response = await client.get(f"http://127.0.0.1:{port}/v1/models")
    assert response.json() == {"object": "list", "data": []}


async def test_ensure_up_without_command_raises_backend_not_ready(
    make_autostarter: MakeAutostarter, port: int
) -> None:
    autostarter = make_autostarter({})

    assert not autostarter.has_command("m")
    with pytest.raises(BackendNotReady, match="no autostart command"):
        await autostarter.ensure_up("m", target_for(port))


async def test_ensure_up_command_that_exits_fails_fast_and_a_later_call_retries(
    make_autostarter: MakeAutostarter, port: int, marker: Path
) -> None:
    autostarter = make_autostarter({"m": command(EXIT_3, port, marker)}, grace_period_s=20.0)

    began = time.monotonic()
    with pytest.raises(BackendNotReady, match="exited with code 3") as failure:
        await autostarter.ensure_up("m", target_for(port))
    assert time.monotonic() - began < 5.0
    assert "cannot load the model" in str(failure.value)
    assert autostarter.status() == {}

    with pytest.raises(BackendNotReady, match="exited with code 3"):
        await autostarter.ensure_up("m", target_for(port))
    assert len(started_pids(marker)) == 2


async def test_ensure_up_command_that_never_serves_is_stopped_after_the_grace_period(
    make_autostarter: MakeAutostarter, port: int, marker: Path
) -> None:
    autostarter = make_autostarter({"m": command(NEVER_SERVES, port, marker)}, grace_period_s=0.8)

    with pytest.raises(BackendNotReady, match="did not become ready") as failure:
        await autostarter.ensure_up("m", target_for(port))

    assert "still loading" in str(failure.value)
    [pid] = started_pids(marker)
    assert not pid_exists(pid)
    assert autostarter.status() == {}


async def test_ensure_up_restarts_a_started_process_that_died(
    make_autostarter: MakeAutostarter, port: int, marker: Path
) -> None:
    autostarter = make_autostarter({"m": command(SERVER, port, marker)})
    await autostarter.ensure_up("m", target_for(port))
    [first] = started_pids(marker)

    os.kill(first, signal.SIGKILL)
    await autostarter.ensure_up("m", target_for(port))

    [_, second] = started_pids(marker)
    assert autostarter.status()["m"]["pid"] == second
    assert not pid_exists(first)


async def test_ensure_up_cancelled_waiter_does_not_cancel_the_shared_start(
    make_autostarter: MakeAutostarter, port: int, marker: Path
) -> None:
    autostarter = make_autostarter({"m": command(SERVER, port, marker, delay=0.5)})
    quitter = asyncio.create_task(autostarter.ensure_up("m", target_for(port)))
    stayer = asyncio.create_task(autostarter.ensure_up("m", target_for(port)))
    await asyncio.sleep(0.2)

    quitter.cancel()
    await stayer

    assert quitter.cancelled()
    assert len(started_pids(marker)) == 1


async def test_close_during_a_start_fails_its_waiters_and_stops_the_process(
    make_autostarter: MakeAutostarter, port: int, marker: Path
) -> None:
    autostarter = make_autostarter({"m": command(SERVER, port, marker, delay=5.0)})
    waiter = asyncio.create_task(autostarter.ensure_up("m", target_for(port)))
    while not started_pids(marker):
        await asyncio.sleep(0.05)

    await autostarter.close()

    with pytest.raises(BackendNotReady, match="shutdown"):
        await waiter
    [pid] = started_pids(marker)
    assert not pid_exists(pid)


async def test_close_stops_the_started_process(
    make_autostarter: MakeAutostarter, port: int, marker: Path
) -> None:
    autostarter = make_autostarter({"m": command(SERVER, port, marker)})
    await autostarter.ensure_up("m", target_for(port))
    [pid] = started_pids(marker)
    assert pid_exists(pid)

    await autostarter.close()

    assert not pid_exists(pid)
    assert autostarter.status() == {}
    with pytest.raises(BackendNotReady):
        await autostarter.ensure_up("m", target_for(port))
