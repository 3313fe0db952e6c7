"""A model server we spawned is reaped however it ends: stopped, crashed while starting, or dead
before its stop (killed from outside). A zombie would hold its pid and show as `<defunct>`
under the proxy for the rest of its life."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from imageworks.backends.supervisor import (
    LaunchSpec,
    ServerProcess,
    StartError,
    spawn,
    wait_healthy,
)
from support.crashing_server import zombie_children
from support.proxy_process import free_port
from support.scripted_llama_server import write_launcher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def started(tmp_path: Path) -> ServerProcess:
    port = free_port()
    launcher = write_launcher(tmp_path)
    spec = LaunchSpec("stand-in", (str(launcher), "--port", str(port)), port, tmp_path / "m.log")
    process = await spawn(spec)
    await wait_healthy(process, 30)
    return process


async def test_a_server_killed_from_outside_is_reaped_by_its_stop(tmp_path: Path) -> None:
    before = set(zombie_children(os.getpid()))
    process = await started(tmp_path)
    os.killpg(process.pid, signal.SIGKILL)  # the OOM killer, say, while it served

    await process.stop(5)

    assert set(zombie_children(os.getpid())) - before == set()
    assert not Path(f"/proc/{process.pid}").exists()


async def test_a_stopped_server_is_reaped(tmp_path: Path) -> None:
    before = set(zombie_children(os.getpid()))
    process = await started(tmp_path)

    await process.stop(5)

    assert set(zombie_children(os.getpid())) - before == set()
    assert process.returncode is not None


# The leader thread ends first while another thread of the process runs on, as when a
# multi-threaded server crashes: the leader shows as a zombie at once, but the process can be
# reaped only once its last thread has exited.
_LEADER_FIRST = """
import ctypes, threading, time
threading.Thread(target=time.sleep, args=(1.0,)).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


async def test_a_server_whose_threads_outlive_its_leader_is_reaped_once_they_end(
    tmp_path: Path,
) -> None:
    before = set(zombie_children(os.getpid()))
    argv = (sys.executable, "-c", _LEADER_FIRST)
    process = await spawn(LaunchSpec("threads", argv, free_port(), tmp_path / "t.log"))
    deadline = time.monotonic() + 10
    while _state(process.pid) != "Z" and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not process.is_alive()  # its leader is a zombie; its other thread still runs

    await process.stop(5)

    # Reaped, not merely dead: nothing of it is left, not even a zombie.
    assert _state(process.pid) is None
    assert set(zombie_children(os.getpid())) - before == set()


# The same, ending in a crash: the leader is a zombie while the signal is still to come.
_CRASH_AFTER_LEADER = """
import ctypes, os, signal, threading, time
def crash():
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGILL)
threading.Thread(target=crash).start()
ctypes.CDLL(None).pthread_exit(None)
"""


async def test_a_crash_while_starting_is_named_even_when_the_leader_dies_first(
    tmp_path: Path,
) -> None:
    argv = (sys.executable, "-c", _CRASH_AFTER_LEADER)
    process = await spawn(LaunchSpec("crash", argv, free_port(), tmp_path / "c.log"))

    with pytest.raises(StartError) as failed:
        await wait_healthy(process, 30)

    assert "was killed by SIGILL while starting" in failed.value.reason
    assert failed.value.signal is signal.SIGILL
    assert failed.value.crashed
    assert _state(process.pid) is None  # reaped


def test_zombie_children_sees_an_unreaped_child() -> None:
    """The check itself: a child that exited and was not waited for is found."""
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while child not in zombie_children(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert child in zombie_children(os.getpid())
    finally:
        os.waitpid(child, 0)
    assert child not in zombie_children(os.getpid())
