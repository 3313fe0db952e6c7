"""ManagedProcess against real processes: a llama.cpp server and tiny Python children."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import httpx
import pytest

from imageworks.backends.supervisor import (
    LaunchSpec,
    ManagedProcess,
    ProcessState,
    StartError,
    port_in_use,
)
from support.llama_cpp_python import server_env
from support.weights import SMOLLM2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]

# Serves 200 on /health and 404 elsewhere on the port given as its first argument.
HEALTH_SERVER = """
import http.server, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass

print("child listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""
IGNORE_SIGTERM = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
# Starts a grandchild that ignores SIGTERM and records its pid in the file named by argv[2].
SPAWN_GRANDCHILD = """
import pathlib, subprocess, sys
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
pathlib.Path(sys.argv[2]).write_text(str(grandchild.pid))
"""
SLEEP_FOREVER = "import time; time.sleep(600)"


class Launch(Protocol):
    def __call__(
        self, argv: Sequence[str], port: int, env: Mapping[str, str] | None = None
    ) -> ManagedProcess: ...


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def python(script: str, *args: object) -> list[str]:
    return [sys.executable, "-c", script, *map(str, args)]


def is_gone(pid: int) -> bool:
    """No such process, or a zombie (an orphan's reaper may be slow or absent in containers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # reaped while we looked
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def wait_gone(pid: int) -> None:
    # SIGKILL is delivered at once but the exit is asynchronous; poll briefly rather than sleep.
    for _ in range(250):
        if is_gone(pid):
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"pid {pid} is still running")


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "nested" / "server.log"


@pytest.fixture
def launch(log_path: Path) -> Iterator[Launch]:
    made: list[ManagedProcess] = []

    def make(
        argv: Sequence[str], port: int, env: Mapping[str, str] | None = None
    ) -> ManagedProcess:
        spec = LaunchSpec(
            name="test-model", argv=tuple(argv), port=port, log_path=log_path, env=env or {}
        )
        made.append(ManagedProcess(spec))
        return made[-1]

    yield make
    for process in made:  # a failed assertion must not leave servers behind
        process.kill_now()


@pytest.mark.timeout(90)
async def test_start_llamacpp_server_ready_then_stop_frees_port(
    launch: Launch, demo_models: Path
) -> None:
    # llama-cpp-python's server, or its stand-in where the package is absent.
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(demo_models / SMOLLM2)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512"]
    server = launch(argv, port, server_env())

    await server.start(timeout_s=60)  # it has no /health: readiness comes from /v1/models

    assert server.state is ProcessState.READY
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(f"http://127.0.0.1:{port}/v1/models")
    assert response.status_code == 200
    pid = server.pid
    assert pid is not None
    await server.stop(timeout_s=10)
    assert server.state is ProcessState.STOPPED
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not await port_in_use("127.0.0.1", port)


async def test_start_fails_at_once_when_process_exits(launch: Launch) -> None:
    server = launch(
        python("import sys; print('boom: no weights', flush=True); sys.exit(3)"), free_port()
    )

    # A 60 s budget against the 20 s test timeout: only an exit-aware wait passes.
    with pytest.raises(StartError) as caught:
        await server.start(timeout_s=60)

    assert "exited with code 3" in caught.value.reason
    assert "boom: no weights" in caught.value.log_tail
    assert "boom: no weights" in str(caught.value)
    assert server.state is ProcessState.FAILED
    assert server.returncode == 3


async def test_start_times_out_and_kills_process_that_never_listens(launch: Launch) -> None:
    server = launch(python(SLEEP_FOREVER), free_port())

    with pytest.raises(StartError, match="did not become ready within 1 s"):
        await server.start(timeout_s=1)

    assert server.state is ProcessState.FAILED
    assert server.pid is not None
    assert is_gone(server.pid)
    assert not server.is_alive()


async def test_start_refuses_port_already_in_use(launch: Launch, log_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = launch(python(HEALTH_SERVER, port), port)

        # The message names who holds the port: here, this very test process.
        taken = f"port {port} on 127.0.0.1 is already in use by pid {os.getpid()} "
        with pytest.raises(StartError, match=taken):
            await server.start(timeout_s=5)

    assert server.pid is None
    assert server.state is ProcessState.FAILED
    assert not log_path.exists()


async def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(launch: Launch) -> None:
    port = free_port()
    server = launch(python(IGNORE_SIGTERM + HEALTH_SERVER, port), port)
    await server.start(timeout_s=10)

    await server.stop(timeout_s=0.5)

    assert server.returncode == -signal.SIGKILL
    assert server.state is ProcessState.STOPPED
    assert not await port_in_use("127.0.0.1", port)


async def test_stop_kills_grandchildren_in_the_process_group(
    launch: Launch, tmp_path: Path
) -> None:
    port, pid_file = free_port(), tmp_path / "grandchild.pid"
    server = launch(python(SPAWN_GRANDCHILD + HEALTH_SERVER, port, pid_file), port)
    await server.start(timeout_s=10)
    grandchild = int(pid_file.read_text())
    assert not is_gone(grandchild)

    await server.stop(timeout_s=5)

    await wait_gone(grandchild)


async def test_start_cancelled_kills_process(launch: Launch) -> None:
    server = launch(python(SLEEP_FOREVER), free_port())

    with pytest.raises(TimeoutError):  # wait_for cancels start() part-way through
        await asyncio.wait_for(server.start(timeout_s=60), timeout=0.5)

    assert server.state is ProcessState.FAILED
    await server.stop(timeout_s=1)
    assert server.state is ProcessState.STOPPED
    assert server.pid is not None
    assert is_gone(server.pid)


async def test_log_gets_header_and_child_output(launch: Launch, log_path: Path) -> None:
    port = free_port()
    server = launch(python(HEALTH_SERVER, port), port)

    await server.start(timeout_s=10)
    await server.stop(timeout_s=5)

    log = log_path.read_text()
    assert "imageworks supervisor: starting test-model:" in log
    assert sys.executable in log
    assert log.index("starting test-model") < log.index("child listening")


async def test_start_after_stop_launches_a_fresh_process(launch: Launch, log_path: Path) -> None:
    port = free_port()
    server = launch(python(HEALTH_SERVER, port), port)
    await server.start(timeout_s=10)
    first_pid = server.pid
    await server.stop(timeout_s=5)

    await server.start(timeout_s=10)

    assert server.state is ProcessState.READY
    assert server.pid != first_pid
    assert log_path.read_text().count("starting test-model") == 2
    await server.stop(timeout_s=5)


async def test_start_while_ready_is_refused(launch: Launch) -> None:
    port = free_port()
    server = launch(python(HEALTH_SERVER, port), port)
    await server.start(timeout_s=10)

    with pytest.raises(RuntimeError, match="while ready"):
        await server.start(timeout_s=10)

    await server.stop(timeout_s=5)


async def test_stop_is_idempotent(launch: Launch) -> None:
    port = free_port()
    server = launch(python(HEALTH_SERVER, port), port)
    await server.stop(timeout_s=1)  # never started
    await server.start(timeout_s=10)

    await server.stop(timeout_s=5)
    await server.stop(timeout_s=5)

    assert server.state is ProcessState.STOPPED


def test_log_tail_returns_last_lines_of_a_large_log(log_path: Path) -> None:
    log_path.parent.mkdir(parents=True)
    log_path.write_text("".join(f"line {n}\n" for n in range(200_000)))
    server = ManagedProcess(LaunchSpec(name="x", argv=("true",), port=1, log_path=log_path))

    assert server.log_tail(3) == "line 199997\nline 199998\nline 199999"


async def test_a_killed_process_is_dead_at_once(launch: Launch) -> None:
    port = free_port()
    server = launch(python(HEALTH_SERVER, port), port)
    await server.start(timeout_s=10)
    pid = server.pid
    assert pid is not None
    assert server.is_alive()

    os.killpg(pid, signal.SIGKILL)
    # No await from here on: the kernel already shows a zombie (or no process), and the GPU
    # slot must not hand it a request.
    while not is_gone(pid):
        pass
    assert not server.is_alive()
    await server.stop(timeout_s=1)
