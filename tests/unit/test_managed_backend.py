"""A lease holds what it was granted: the entry and launch plan of the process it runs on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imageworks.backends.base import Dialect
from imageworks.backends.gpu import GpuSlot
from imageworks.backends.managed import HolderKey, LaunchPlan, ManagedBackend, Plan
from imageworks.backends.slot import Rules
from imageworks.backends.supervisor import LaunchSpec
from imageworks.registry.schema import RegistryEntry

pytestmark = pytest.mark.timeout(10)


@dataclass
class FakeServer:
    command: tuple[str, ...]
    pid: int | None = None

    safe_mode: tuple[str, ...] = ()

    def is_alive(self) -> bool:
        return True

    def kill_now(self) -> None:
        pass


@dataclass
class RecordingEffects:
    started: list[tuple[str, ...]] = field(default_factory=list)

    async def start(
        self, key: HolderKey, plan: Plan, *, progress: Callable[[str], None]
    ) -> FakeServer:
        assert isinstance(plan, LaunchPlan)
        self.started.append(plan.spec.argv)
        return FakeServer(plan.spec.argv)

    async def check_adopted(self, holder: FakeServer) -> None:
        pass

    async def stop(self, holder: FakeServer) -> None:
        pass


def entry(served_id: str) -> RegistryEntry:
    return RegistryEntry(name="smol", backend="llamacpp", served_model_id=served_id)


def plan_for(tmp_path: Path) -> object:
    def plan(chosen: RegistryEntry) -> LaunchPlan:
        argv = ("llama-server", "--alias", chosen.upstream_model_id)
        spec = LaunchSpec(name=chosen.name, argv=argv, port=24001, log_path=tmp_path / "x.log")
        return LaunchPlan(chosen, spec)

    return plan


async def test_a_registry_reload_mid_request_keeps_each_request_on_its_own_entry(
    tmp_path: Path,
) -> None:
    effects = RecordingEffects()
    slot: GpuSlot[HolderKey, Plan, FakeServer] = GpuSlot(effects, Rules())  # type: ignore[arg-type]
    backend = ManagedBackend(slot, plan_for(tmp_path), lambda _entry: None)  # type: ignore[arg-type]
    old, new = entry("smol-v1"), entry("smol-v2")  # the same name, edited in between
    finish_old = asyncio.Event()
    seen: dict[str, str] = {}

    async def ask(chosen: RegistryEntry, tag: str, until: asyncio.Event | None = None) -> None:
        async with backend.lease(chosen) as target:
            seen[tag] = target.model
            if until is not None:
                await until.wait()

    running = asyncio.create_task(ask(old, "before the edit", finish_old))
    await asyncio.sleep(0.01)
    edited = asyncio.create_task(ask(new, "after the edit"))
    await asyncio.sleep(0.01)
    assert "after the edit" not in seen  # another command: it waits for its own process
    finish_old.set()
    await asyncio.gather(running, edited)
    assert seen == {"before the edit": "smol-v1", "after the edit": "smol-v2"}
    assert effects.started == [
        ("llama-server", "--alias", "smol-v1"),
        ("llama-server", "--alias", "smol-v2"),
    ]
    await slot.close(stop_holder=True, timeout_s=5)


async def test_a_lease_says_which_server_it_runs_on(tmp_path: Path) -> None:
    def plan(chosen: RegistryEntry) -> LaunchPlan:
        spec = LaunchSpec(
            name=chosen.name,
            argv=("python", "-m", "llama_cpp.server"),
            port=24001,
            log_path=tmp_path / "x.log",
            dialect=Dialect.LLAMA_CPP_PYTHON,
        )
        return LaunchPlan(chosen, spec)

    slot: GpuSlot[HolderKey, Plan, FakeServer] = GpuSlot(RecordingEffects(), Rules())  # type: ignore[arg-type]
    backend = ManagedBackend(slot, plan, lambda _entry: None)
    async with backend.lease(entry("smol")) as target:
        assert target.dialect is Dialect.LLAMA_CPP_PYTHON
        assert target.model == "smol"
    await slot.close(stop_holder=True, timeout_s=5)
