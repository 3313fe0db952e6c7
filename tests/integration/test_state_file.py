"""The state file and the recorded (adopted) process against real processes, /proc and a
second process's lock."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from imageworks.backends.procfs import is_same_process, process_start_ticks
from imageworks.backends.state import ManagedState, StateFile, StateLockTimeout, recorded_process
from support.child_processes import popen

pytestmark = [pytest.mark.integration, pytest.mark.timeout(20)]

SLEEP = "import time; print('ready', flush=True); time.sleep(600)"
IGNORE_SIGTERM = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + SLEEP
# A group leader that honours SIGTERM, with a worker in its group that ignores it; prints the
# worker's pid once the worker is ready.
LEADER_WITH_STUBBORN_WORKER = f"""
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", {IGNORE_SIGTERM!r}], stdout=subprocess.PIPE)
worker.stdout.readline()
print(worker.pid, flush=True)
time.sleep(600)
"""
HOLD_LOCK = """
import sys, time
from pathlib import Path
from imageworks.backends.state import StateFile
with StateFile(Path(sys.argv[1])).locked():
    print("locked", flush=True)
    time.sleep(600)
"""

Spawn = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start `python -c code *args` in a new session (pid == pgid), as the supervisor does."""
    children: list[subprocess.Popen[str]] = []

    def start(code: str, *args: str) -> subprocess.Popen[str]:
        child = popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:  # still our unreaped child, so its group is still its own
            os.killpg(child.pid, signal.SIGKILL)
    for child in children:
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


def started(child: subprocess.Popen[str]) -> str:
    """Wait for the child's first line (it prints once set up) and return it."""
    assert child.stdout is not None
    return child.stdout.readline().strip()


def state_for(pid: int, **changes: Any) -> ManagedState:
    ticks = process_start_ticks(pid)
    assert ticks is not None
    state = ManagedState(
        entry="smollm2-135m",
        served_model_id="smollm2",
        backend="llamacpp",
        port=24001,
        pid=pid,
        process_start=ticks,
        command=["python", "-m", "llama_cpp.server", "--port", "24001"],
        started_at=datetime.now(UTC).isoformat(),
        log_path="/tmp/logs/smollm2.log",
        owner="loader",
    )
    return dataclasses.replace(state, **changes)


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_state_file_round_trip(tmp_path: Path) -> None:
    states = StateFile(tmp_path / "_staging" / "active_vllm.json")
    state = state_for(os.getpid())
    states.write(state)
    assert states.read() == state
    assert ManagedState.from_json(state.to_json()) == state


def test_state_file_read_without_file_is_none(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "active_vllm.json").read() is None


def test_state_file_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    states = StateFile(tmp_path / "new_dir" / "active_vllm.json")
    states.write(state_for(os.getpid(), entry="first"))
    states.write(state_for(os.getpid(), entry="second"))
    assert os.listdir(tmp_path / "new_dir") == ["active_vllm.json"]
    assert (read := states.read()) is not None
    assert read.entry == "second"


@pytest.mark.parametrize(
    "content",
    [
        "{ not json",
        "[1, 2]",
        '{"entry": "smollm2-135m", "pid": 123}',  # missing fields
        "\xff\xfe",
    ],
    ids=["corrupt", "not-an-object", "missing-fields", "not-utf8"],
)
def test_state_file_invalid_content_is_moved_aside(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "active_vllm.json"
    path.write_bytes(content.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="imageworks.backends.state"):
        assert StateFile(path).read() is None
    assert not path.exists()
    [aside] = tmp_path.glob("active_vllm.json.corrupt-*")
    assert aside.read_bytes() == content.encode("latin-1")
    [record] = caplog.records
    assert str(path) in record.getMessage()
    assert str(aside) in record.getMessage()


def test_state_file_invalid_values_are_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "active_vllm.json"
    path.write_text(state_for(os.getpid()).to_json().replace(f'"pid": {os.getpid()}', '"pid": 0'))
    assert StateFile(path).read() is None
    assert len(list(tmp_path.glob("active_vllm.json.corrupt-*"))) == 1


def test_managed_state_rejects_invalid_values() -> None:
    with pytest.raises(ValueError, match="owner"):
        state_for(os.getpid(), owner="somebody")
    with pytest.raises(ValueError, match="UTC offset"):
        state_for(os.getpid(), started_at="2024-01-01T00:00:00")


def test_state_file_clear_removes_the_file_and_tolerates_none(tmp_path: Path) -> None:
    states = StateFile(tmp_path / "active_vllm.json")
    states.write(state_for(os.getpid()))
    states.clear()
    states.clear()
    assert not states.path.exists()


def test_process_start_ticks_of_our_pid_is_an_int() -> None:
    ticks = process_start_ticks(os.getpid())
    assert isinstance(ticks, int)
    assert ticks == process_start_ticks(os.getpid())


def test_process_start_ticks_survives_parentheses_and_spaces_in_comm(spawn: Spawn) -> None:
    child = spawn(
        "import pathlib, time\n"
        "start = pathlib.Path('/proc/self/stat').read_text().split()[21]\n"
        "pathlib.Path('/proc/self/comm').write_text('a) b (c')\n"
        "print(start, flush=True)\n"
        "time.sleep(600)\n"
    )
    start = int(started(child))
    assert Path(f"/proc/{child.pid}/comm").read_text().strip() == "a) b (c"
    assert process_start_ticks(child.pid) == start
    assert is_same_process(child.pid, start)


def test_process_start_ticks_of_a_dead_pid_is_none(spawn: Spawn) -> None:
    child = spawn("pass")
    child.wait()
    assert process_start_ticks(child.pid) is None
    assert process_start_ticks(0) is None


def test_is_same_process_false_for_another_start_time(spawn: Spawn) -> None:
    child = spawn(SLEEP)
    started(child)
    ticks = process_start_ticks(child.pid)
    assert ticks is not None
    assert is_same_process(child.pid, ticks)
    assert not is_same_process(child.pid, ticks - 1)  # the pid was reused by this process


def test_is_same_process_false_for_a_zombie(spawn: Spawn) -> None:
    child = spawn(SLEEP)
    started(child)
    ticks = process_start_ticks(child.pid)
    assert ticks is not None
    os.kill(child.pid, signal.SIGKILL)
    wait_until(lambda: proc_state(child.pid) == "Z")  # exited, not reaped yet
    assert not is_same_process(child.pid, ticks)
    assert process_start_ticks(child.pid) is None
    child.wait()
    assert not is_same_process(child.pid, ticks)


def test_state_file_live_keeps_a_live_record(tmp_path: Path, spawn: Spawn) -> None:
    child = spawn(SLEEP)
    started(child)
    states = StateFile(tmp_path / "active_vllm.json")
    states.write(state := state_for(child.pid))
    with states.locked():
        assert states.live() == state
    assert states.path.exists()


def test_state_file_live_clears_a_dead_record(
    tmp_path: Path, spawn: Spawn, caplog: pytest.LogCaptureFixture
) -> None:
    child = spawn(SLEEP)
    started(child)
    states = StateFile(tmp_path / "active_vllm.json")
    states.write(state_for(child.pid))
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    with caplog.at_level(logging.INFO, logger="imageworks.backends.state"), states.locked():
        assert states.live() is None
    assert not states.path.exists()
    assert "has exited" in caplog.text


def test_state_file_live_clears_a_record_whose_pid_was_reused(tmp_path: Path, spawn: Spawn) -> None:
    child = spawn(SLEEP)
    started(child)
    states = StateFile(tmp_path / "active_vllm.json")
    ticks = process_start_ticks(child.pid)
    assert ticks is not None
    states.write(state_for(child.pid, process_start=ticks - 1))
    with states.locked():
        assert states.live() is None
    assert child.poll() is None


def test_state_file_lock_held_by_another_process_times_out(tmp_path: Path, spawn: Spawn) -> None:
    path = tmp_path / "active_vllm.json"
    holder = spawn(HOLD_LOCK, str(path))
    assert started(holder) == "locked"
    states = StateFile(path, lock_timeout_s=0.2)
    began = time.monotonic()
    with pytest.raises(StateLockTimeout, match="held elsewhere"), states.locked():
        pytest.fail("entered a lock another process holds")
    assert time.monotonic() - began < 2.0
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    with states.locked():  # a holder that died released the lock with it
        states.write(state_for(os.getpid()))


def test_adopted_process_is_a_drop_in_holder(spawn: Spawn) -> None:
    child = spawn(SLEEP)
    started(child)
    adopted = recorded_process(state_for(child.pid, port=24099), host="127.0.0.2")
    assert (adopted.pid, adopted.spec.port) == (child.pid, 24099)
    assert adopted.spec.name == "smollm2-135m"
    assert adopted.spec.argv == tuple(state_for(child.pid).command)
    assert (adopted.spec.host, adopted.spec.port) == ("127.0.0.2", 24099)
    assert adopted.spec.log_path == Path("/tmp/logs/smollm2.log")
    assert adopted.is_alive()


async def test_adopted_process_stop_terminates_the_group_with_sigterm(spawn: Spawn) -> None:
    leader = spawn(LEADER_WITH_STUBBORN_WORKER)
    worker_pid = int(started(leader))
    worker_start = process_start_ticks(worker_pid)
    assert worker_start is not None
    adopted = recorded_process(state_for(leader.pid))

    await adopted.stop(timeout_s=5.0)

    assert leader.wait(timeout=1) == -signal.SIGTERM
    assert not adopted.is_alive()
    # The worker ignored SIGTERM; it is swept once its leader is gone (it is not our child:
    # whoever reaps orphans here may leave it a zombie for a moment, which counts as gone).
    wait_until(lambda: not is_same_process(worker_pid, worker_start))


async def test_adopted_process_stop_escalates_to_sigkill(
    spawn: Spawn, caplog: pytest.LogCaptureFixture
) -> None:
    child = spawn(IGNORE_SIGTERM)
    started(child)
    adopted = recorded_process(state_for(child.pid))
    began = time.monotonic()

    await adopted.stop(timeout_s=0.2)

    assert time.monotonic() - began < 3.0
    assert child.wait(timeout=1) == -signal.SIGKILL
    assert "SIGKILL" in caplog.text
    await adopted.stop(timeout_s=0.2)  # idempotent


async def test_adopted_process_stop_never_signals_a_reused_pid(spawn: Spawn) -> None:
    child = spawn(SLEEP)
    started(child)
    ticks = process_start_ticks(child.pid)
    assert ticks is not None
    adopted = recorded_process(state_for(child.pid, process_start=ticks + 1))

    await adopted.stop(timeout_s=0.2)
    adopted.kill_now()

    assert not adopted.is_alive()
    await asyncio.sleep(0.1)
    assert child.poll() is None


async def test_adopted_process_stop_cancelled_kills_the_process(spawn: Spawn) -> None:
    child = spawn(IGNORE_SIGTERM)
    started(child)
    adopted = recorded_process(state_for(child.pid))
    stopping = asyncio.create_task(adopted.stop(timeout_s=60.0))
    await asyncio.sleep(0.2)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert child.wait(timeout=2) == -signal.SIGKILL


def test_adopted_process_kill_now(spawn: Spawn) -> None:
    child = spawn(IGNORE_SIGTERM)
    started(child)
    adopted = recorded_process(state_for(child.pid))
    adopted.kill_now()
    assert child.wait(timeout=2) == -signal.SIGKILL
    adopted.kill_now()  # gone: nothing to signal
