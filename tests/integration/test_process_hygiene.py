"""support.process_hygiene: no process a test run started outlives it. Each test runs pytest
(with the plugin) on a small test file, and looks at what that run's processes became, by this
session's own mark: every process the inner run starts, its watchdog included, also carries
the mark of the test here that started the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import session_processes
from support.child_processes import popen
from support.process_hygiene import session_of
from support.session_processes import SessionProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TESTS = Path(__file__).resolve().parents[1]
INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\ntimeout = 60\n"

# A test that starts a process (through the suite's helper), says it is ready, and waits.
WAITS_WITH_A_CHILD = """
import subprocess, sys, time
from pathlib import Path
from support.child_processes import popen

def test_waits_with_a_child():
    child = popen([sys.executable, "-c", "print(flush=True); import time; time.sleep(600)"],
                  stdout=subprocess.PIPE)
    child.stdout.readline()  # it runs
    Path("ready").touch()
    time.sleep(600)
"""

# The user's case: a real proxy that started its model server (the scripted llama-server), and
# besides, a "model server" started without the helper in a session of its own, which only the
# watchdog can stop once pytest is gone.
SERVES_A_MODEL = """
import json, subprocess, sys, time
from pathlib import Path
from support.proxy_process import Workspace
from support.scripted_llama_server import write_launcher

ENTRY = {"name": "echo", "backend": "llamacpp", "served_model_id": "echo"}

def test_serves_a_model(tmp_path):
    (tmp_path / "echo.gguf").write_bytes(b"GGUF")
    (tmp_path / "configs").mkdir()
    registry = [{**ENTRY, "download_path": str(tmp_path / "echo.gguf")}]
    (tmp_path / "configs" / "model_registry.curated.json").write_text(json.dumps(registry))
    ws = Workspace(tmp_path)
    ws.extra_env.update(
        CHAT_PROXY_LLAMA_SERVER_BINARY=str(write_launcher(tmp_path)),
        CHAT_PROXY_REQUIRE_TEMPLATE="0",
        CHAT_PROXY_INCLUDE_NON_INSTALLED="1",
    )
    proxy = ws.start_proxy()
    assert proxy.chat("echo").status_code == 200
    stray = subprocess.Popen([sys.executable, "-c", "print(flush=True); import time; "
                              "time.sleep(600)"], stdout=subprocess.PIPE, start_new_session=True)
    stray.stdout.readline()
    Path("ready").write_text(str(stray.pid))
    time.sleep(600)
"""

LEAVES_A_PROCESS = """
import subprocess, sys
from support.child_processes import popen

def test_leaves_a_process_running():
    child = popen([sys.executable, "-c", "print(flush=True); import time; time.sleep(600)"],
                  stdout=subprocess.PIPE)
    child.stdout.readline()

def test_after_it():
    pass
"""

# What the suite's own tests do with processes, none of which is left running at the end.
STOPS_WHAT_IT_STARTS = """
import os, signal, subprocess, sys
import pytest
from support.child_processes import popen

SLEEP = [sys.executable, "-c", "print(flush=True); import time; time.sleep(600)"]

@pytest.fixture(scope="module")
def kept_for_the_module():
    child = popen(SLEEP, stdout=subprocess.PIPE)
    child.stdout.readline()
    yield child
    child.terminate()
    child.wait()

def test_uses_the_module_process(kept_for_the_module):
    assert kept_for_the_module.poll() is None

def test_kills_its_child_and_does_not_reap_it():  # a zombie until pytest exits: not running
    child = popen(SLEEP, stdout=subprocess.PIPE)
    child.stdout.readline()
    child.kill()

def test_kills_a_group_of_its_own():  # as a test ends the model server a killed proxy left
    child = popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen("
                   "[sys.executable, '-c', 'import time; time.sleep(600)']); print(flush=True); "
                   "time.sleep(600)"], stdout=subprocess.PIPE, start_new_session=True)
    child.stdout.readline()
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()

def test_uses_multiprocessing():  # its resource tracker lives as long as pytest
    import multiprocessing
    worker = multiprocessing.get_context("spawn").Process(target=print)
    worker.start()
    worker.join()
"""


@dataclass
class InnerRun:
    """pytest, with the plugin, on one test file in `root`."""

    root: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, source: str) -> subprocess.Popen[bytes]:
        (self.root / "pytest.ini").write_text(INI)
        (self.root / "test_inner.py").write_text(source)
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
        env["PYTHONPATH"] = str(TESTS)
        argv = [sys.executable, "-m", "pytest", "-p", "support.process_hygiene"]
        argv += ["-p", "no:cacheprovider", "--basetemp", str(self.root / "tmp"), "test_inner.py"]
        with (self.root / "output").open("wb") as output:
            self.process = popen(argv, cwd=self.root, env=env, stdout=output, stderr=output)
        return self.process

    def wait_ready(self, timeout_s: float = 60) -> str:
        """Once the inner test says it is ready: what it wrote."""
        ready = self.root / "ready"
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            assert self.process is not None
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)
        return ready.read_text()

    def output(self) -> str:
        return (self.root / "output").read_text(errors="replace")


@pytest.fixture
def inner(tmp_path: Path) -> Iterator[InnerRun]:
    run = InnerRun(tmp_path)
    yield run
    if run.process is not None and run.process.poll() is None:
        run.process.kill()
        run.process.wait()


@pytest.fixture
def started_here(request: pytest.FixtureRequest) -> Callable[[], list[SessionProcess]]:
    """The live processes this test started, directly or not."""
    session = session_of(request.config)
    return lambda: [p for p in session_processes.find(session) if p.test == request.node.nodeid]


def commands(processes: list[SessionProcess]) -> str:
    return "\n".join(process.command for process in processes)


def wait_until_none(find: Callable[[], list[SessionProcess]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while left := find():
        assert time.monotonic() < deadline, f"still running:\n{commands(left)}"
        time.sleep(0.05)


def test_sigterm_to_pytest_stops_the_proxy_and_its_model_server_before_pytest_exits(
    inner: InnerRun, started_here: Callable[[], list[SessionProcess]]
) -> None:
    run = inner.start(SERVES_A_MODEL)
    stray = int(inner.wait_ready())
    running = commands(started_here())
    assert "imageworks-chat-proxy" in running
    assert "llama-server" in running
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == pytest.ExitCode.INTERRUPTED, inner.output()
    assert started_here() == []  # at once: stopped before pytest went on
    output = inner.output()
    assert "stopped on SIGTERM:" in output
    assert "imageworks-chat-proxy" in output
    assert f"pid {stray} " in output


def test_sigint_to_pytest_stops_the_tests_processes_and_pytest_stops_as_on_ctrl_c(
    inner: InnerRun, started_here: Callable[[], list[SessionProcess]]
) -> None:
    run = inner.start(WAITS_WITH_A_CHILD)
    inner.wait_ready()
    assert "time.sleep(600)" in commands(started_here())
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == pytest.ExitCode.INTERRUPTED, inner.output()
    assert started_here() == []
    output = inner.output()
    assert "KeyboardInterrupt" in output
    assert "stopped on SIGINT:" in output


def test_a_process_left_running_fails_the_run_and_is_named_and_stopped(
    inner: InnerRun, started_here: Callable[[], list[SessionProcess]]
) -> None:
    run = inner.start(LEAVES_A_PROCESS)
    assert run.wait(timeout=60) == pytest.ExitCode.TESTS_FAILED, inner.output()
    assert started_here() == []
    output = inner.output()
    assert "1 process that the tests started still ran at the end (now stopped):" in output
    assert "started during test_inner.py::test_leaves_a_process_running: " in output
    assert "time.sleep(600)" in output
    assert "2 passed, 1 error" in output.splitlines()[-1]


def test_processes_stopped_by_their_tests_do_not_fail_the_run(inner: InnerRun) -> None:
    run = inner.start(STOPS_WHAT_IT_STARTS)
    assert run.wait(timeout=60) == pytest.ExitCode.OK, inner.output()


def test_sigkill_to_pytest_leaves_nothing_running_soon_after(
    inner: InnerRun, started_here: Callable[[], list[SessionProcess]]
) -> None:
    run = inner.start(SERVES_A_MODEL)
    stray = int(inner.wait_ready())
    assert stray in {process.pid for process in started_here()}
    run.kill()  # nothing of pytest's runs any more: its children's signal and its watchdog act
    run.wait()
    wait_until_none(started_here, timeout_s=30)
