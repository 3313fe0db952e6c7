"""support.child_processes: the children tests start die with their parent, even by SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.child_processes import popen, run
from support.proxy_process import pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

TESTS = Path(__file__).resolve().parents[1]
SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
# A parent that is not pytest: it starts SLEEP through the helper, prints the child's pid, waits.
PARENT = f"""
import sys, time
sys.path.insert(0, {str(TESTS)!r})
from support.child_processes import popen
print(popen({SLEEP!r}).pid, flush=True)
time.sleep(600)
"""


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def is_running(child: subprocess.Popen[bytes], argv: list[str]) -> bool:
    cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes()
    return cmdline.split(b"\0")[:-1] == [arg.encode() for arg in argv]


@pytest.fixture
def sleeper() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The children a test starts, killed afterwards whatever happened."""
    children: list[subprocess.Popen[bytes]] = []
    yield children
    for child in children:
        child.kill()
        child.wait()


def test_popen_child_gets_sigterm_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert pid_alive(child)
    finally:
        parent.kill()  # SIGKILL: the parent runs no code of its own any more
        parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
    wait_until(lambda: not pid_alive(child))


def test_popen_child_is_the_command_itself(sleeper: list[subprocess.Popen[bytes]]) -> None:
    child = popen(SLEEP, stdout=subprocess.PIPE)
    sleeper.append(child)
    assert child.args == SLEEP
    wait_until(lambda: is_running(child, SLEEP))  # same pid: the stub execs the command
    assert os.getpgid(child.pid) == os.getpgrp()


def test_popen_child_started_from_another_thread_outlives_that_thread(
    sleeper: list[subprocess.Popen[bytes]],
) -> None:
    # The parent-death signal follows the thread that forked: set from a thread that ends, it
    # would kill the child then. Only children of the main thread get it.
    def start() -> None:
        child = popen(SLEEP)
        sleeper.append(child)
        wait_until(lambda: is_running(child, SLEEP))  # past the point a stub would set it

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    time.sleep(0.5)  # a child given the signal would have been sent SIGTERM by now
    assert sleeper[0].poll() is None


def test_popen_of_a_missing_program_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        popen([str(tmp_path / "no-such-program")])
    with pytest.raises(FileNotFoundError):
        popen(["no-such-program-anywhere"], env={"PATH": str(tmp_path)})


def test_run_returns_the_commands_result_and_its_args() -> None:
    result = run([sys.executable, "-c", "print('hi')"], capture_output=True, text=True, check=True)
    assert result.stdout == "hi\n"
    assert result.args[1:] == ["-c", "print('hi')"]
