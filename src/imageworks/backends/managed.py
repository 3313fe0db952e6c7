"""What holds the GPU, and the effects the slot uses to change it.

A holder is a model server on the managed port (`ServerProcess`: one we spawned, or one found in
the state file) or Ollama (`OllamaHolder`: whatever Ollama keeps loaded). A lease asks for a
typed key, with the plan to start it: `LaunchPlan` (the registry entry and the command made
from it) or `OllamaPlan`. The key of a model server includes its command, so a registry edit
that changes how an entry is launched restarts it, and the id forwarded always comes from the
entry that started the process.

The effects are transactional. A start records the process in the state file the moment it is
spawned (phase starting), before its health check, and marks it ready after; if any step after
the spawn fails, or the start is cancelled, it kills what it spawned before it reports. A stop
marks the record stopping before it signals. Before a model server starts, Ollama is asked to
unload everything; before Ollama serves, the model server is stopped.

A server killed by a crash signal before it is healthy is started once more in safe mode (its
launcher's `safe_mode_args`); if that one comes up, its binary is remembered (safe_mode.py) and
starts in safe mode from then on. The key stays the entry's: a safe-mode start of an entry is
the same holder, so a request for it never swaps it out again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shlex
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from imageworks.backends.base import BackendNotReady, Target
from imageworks.backends.external import external_target
from imageworks.backends.gpu import GpuSlot, StartLeftover
from imageworks.backends.ollama import OllamaManager, OllamaUnavailable
from imageworks.backends.safe_mode import SafeModeMemory
from imageworks.backends.state import ManagedState, StateFile, recorded_process
from imageworks.backends.supervisor import (
    LaunchSpec,
    ProcessSurvived,
    ServerProcess,
    StartError,
    note,
    spawn,
    wait_healthy,
)
from imageworks.registry.schema import RegistryEntry

log = logging.getLogger("imageworks.backends.managed")

_FAILED_START_STOP_S = 5.0  # a server that never came up has no work worth a long grace period


@dataclass(frozen=True, slots=True)
class ModelServerKey:
    """A model server on the managed port: this entry, launched with this command."""

    entry: str
    command: tuple[str, ...]

    def __str__(self) -> str:
        return self.entry


@dataclass(frozen=True, slots=True)
class OllamaKey:
    """The Ollama at `root_url` holds the GPU."""

    root_url: str

    def __str__(self) -> str:
        return f"@ollama {self.root_url}"


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    entry: RegistryEntry
    spec: LaunchSpec

    @property
    def key(self) -> ModelServerKey:
        return ModelServerKey(self.entry.name, self.spec.argv)


@dataclass(frozen=True, slots=True)
class OllamaPlan:
    root_url: str

    @property
    def key(self) -> OllamaKey:
        return OllamaKey(self.root_url)


HolderKey = ModelServerKey | OllamaKey
Plan = LaunchPlan | OllamaPlan | None  # None: an adopted process no entry can serve any more


class OllamaHolder:
    """Ollama as the GPU's holder: it loads and unloads its own models."""

    pid = None
    safe_mode: tuple[str, ...] = ()

    def __init__(self, root_url: str) -> None:
        self.root_url = root_url

    def is_alive(self) -> bool:
        return True

    def kill_now(self) -> None:
        """Ollama is not ours to kill; its models are unloaded by the next start."""


GpuHolder = ServerProcess | OllamaHolder
Slot = GpuSlot[HolderKey, Plan, GpuHolder]


class GpuEffects:
    """Start and stop holders, keeping Ollama and the state file in step. Used by the slot, and
    by `imageworks-loader activate-model` when no proxy runs (owner "loader")."""

    def __init__(
        self,
        state_file: StateFile,
        ollama: Callable[[str], OllamaManager],
        default_ollama: str | None,
        *,
        start_timeout_s: float,
        stop_timeout_s: float,
        health_timeout_s: float | None = None,
        owner: str = "proxy",
        safe_mode: SafeModeMemory | None = None,
    ) -> None:
        self._state_file = state_file
        self._ollama = ollama
        # Every Ollama that may hold VRAM: the default one and any an entry has used.
        self._ollama_roots = {default_ollama.rstrip("/")} if default_ollama else set()
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        # A process recorded ready should answer at once; one recorded starting gets the time a
        # start would have.
        self._health_timeout_s = health_timeout_s or start_timeout_s
        self._owner = owner
        self._safe_mode = safe_mode or SafeModeMemory(None)

    async def start(
        self, key: HolderKey, plan: Plan, *, progress: Callable[[str], None] | None = None
    ) -> GpuHolder:
        step = progress or (lambda _: None)
        if isinstance(plan, OllamaPlan):
            self._ollama_roots.add(plan.root_url)
            step("asking Ollama")
            await self._ollama(plan.root_url).version()  # unreachable: 503, and nothing swapped
            return OllamaHolder(plan.root_url)
        if plan is None:
            raise BackendNotReady(f"{key}: no registry entry can start it")
        step("unloading Ollama")
        await self._free_ollama_vram()
        name = plan.entry.name
        try:
            process = await self._start_server(plan.entry, plan.spec, step)
        except StartError as exc:
            raise BackendNotReady(f"{name} could not be started: {exc}") from exc
        log.info("started %s (pid %d): %s", name, process.pid, shlex.join(process.spec.argv))
        return process

    async def _start_server(
        self, entry: RegistryEntry, spec: LaunchSpec, step: Callable[[str], None]
    ) -> ServerProcess:
        """Start `spec`, in safe mode if its binary needs it here; a crash at load is retried
        once in safe mode. StartError says why it did not come up."""
        if await asyncio.to_thread(self._safe_mode.recall, spec) is not None:
            spec = spec.in_safe_mode()
        try:
            return await self._spawn_until_healthy(entry, spec, step)
        except StartError as exc:
            if exc.crashed and spec.safe_mode:  # safe mode was this binary's last resort
                raise _crashed_in_safe_mode(entry, spec, exc) from exc
            if not (exc.crashed and self._safe_mode.retries and spec.safe_mode_args):
                raise
            crash = exc
        safe = spec.in_safe_mode()
        args = " ".join(safe.safe_mode_args)
        log.warning("%s; retrying once in safe mode (%s)", crash.reason, args)
        note(safe, f"{crash.reason}; retrying once in safe mode ({args})")
        step(f"retrying in safe mode ({args})")
        try:
            process = await self._spawn_until_healthy(entry, safe, step)
        except StartError as again:
            if not again.crashed:
                raise
            raise _crashed_in_safe_mode(entry, safe, again, first=crash) from again
        # Worth remembering only now: safe mode is what made the difference.
        await asyncio.to_thread(self._safe_mode.remember, spec, crash.reason)
        return process

    async def _spawn_until_healthy(
        self, entry: RegistryEntry, spec: LaunchSpec, step: Callable[[str], None]
    ) -> ServerProcess:
        step("spawning")
        process = await spawn(spec)
        try:
            await self._record(process, entry, "starting")
            step("waiting for health")
            await wait_healthy(process, self._start_timeout_s)
            await self._set_phase(process, "ready")
        except BaseException as exc:  # cancellation included: never leave it running
            await self._abandon(process)
            if isinstance(exc, OSError | TimeoutError):
                raise BackendNotReady(
                    f"{entry.name}: could not record the process in the state file "
                    f"{self._state_file.path}: {exc}"
                ) from exc
            raise
        return process

    async def check_adopted(self, holder: GpuHolder) -> None:
        if isinstance(holder, OllamaHolder):
            return
        try:
            recorded = await asyncio.to_thread(self._read)
            starting = recorded is not None and recorded.phase == "starting"
            timeout = self._start_timeout_s if starting else self._health_timeout_s
            await wait_healthy(holder, timeout)
            await self._set_phase(holder, "ready")
        except BaseException as exc:
            await self._abandon(holder)
            if isinstance(exc, StartError | OSError | TimeoutError):
                raise BackendNotReady(f"the adopted {holder.spec.name} is unusable: {exc}") from exc
            raise

    async def stop(self, holder: GpuHolder) -> None:
        if isinstance(holder, OllamaHolder):
            await self._free_ollama_vram()
            return
        try:
            await self._set_phase(holder, "stopping")
        except (OSError, TimeoutError) as exc:  # the stop matters more than the record
            log.warning("could not mark %s stopping in the state file: %s", holder.spec.name, exc)
        await holder.stop(self._stop_timeout_s)  # ProcessSurvived: the slot keeps it, STUCK
        await self._forget(holder)

    async def _abandon(self, process: ServerProcess) -> None:
        """Kill a process whose start (or adoption) failed, and drop its record."""
        try:
            await process.stop(_FAILED_START_STOP_S)
        except ProcessSurvived as exc:
            raise StartLeftover(str(exc), process) from exc
        await self._forget(process)

    async def _free_ollama_vram(self) -> None:
        for root in sorted(self._ollama_roots):
            try:
                await self._ollama(root).unload_all()
            except OllamaUnavailable as exc:
                # An Ollama we cannot reach holds nothing we could free; it must not block vLLM.
                log.info("Ollama not reachable, nothing to unload: %s", exc)

    async def _record(self, process: ServerProcess, entry: RegistryEntry, phase: str) -> None:
        state = ManagedState(
            entry=entry.name,
            served_model_id=entry.upstream_model_id,
            backend=entry.backend,
            port=process.spec.port,
            pid=process.pid,
            process_start=process.start_ticks,
            command=list(process.spec.argv),
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            log_path=str(process.spec.log_path),
            owner=self._owner,
            phase=phase,
            safe_mode=list(process.safe_mode),
        )

        def write() -> None:
            with self._state_file.locked():
                self._state_file.write(state)

        await asyncio.to_thread(write)

    def _read(self) -> ManagedState | None:
        with self._state_file.locked():
            return self._state_file.read()

    async def _set_phase(self, process: ServerProcess, phase: str) -> None:
        def update() -> None:
            with self._state_file.locked():
                recorded = self._state_file.read()
                if recorded is not None and recorded.pid == process.pid:
                    self._state_file.write(dataclasses.replace(recorded, phase=phase))

        await asyncio.to_thread(update)

    async def _forget(self, process: ServerProcess) -> None:
        """Drop the record of a process that is gone; best effort (a record of a dead process
        is harmless: liveness checks pid and start time)."""

        def clear() -> None:
            with self._state_file.locked():
                recorded = self._state_file.read()
                if recorded is None or recorded.pid == process.pid:
                    self._state_file.clear()

        try:
            await asyncio.to_thread(clear)
        except (OSError, TimeoutError) as exc:
            log.warning("could not clear %s: %s", self._state_file.path, exc)


def _crashed_in_safe_mode(
    entry: RegistryEntry, safe: LaunchSpec, crash: StartError, *, first: StartError | None = None
) -> StartError:
    """Why a server crashed at load in safe mode (after `first`, the crash without it), with
    what to try: its launcher's hint."""
    args = " ".join(safe.safe_mode_args)
    if first is None:
        how = f"killed by {crash.signal_name} while loading in safe mode ({args})"
    elif crash.signal == first.signal:
        how = f"killed by {crash.signal_name} while loading, also in safe mode ({args})"
    else:
        how = (
            f"killed by {first.signal_name} while loading, "
            f"and by {crash.signal_name} in safe mode ({args})"
        )
    return StartError(
        f"{entry.name}: {how} (log: {safe.log_path}); {safe.crash_hint}",
        crash.log_tail,
        died_from=crash.signal,
    )


@dataclass(frozen=True, slots=True)
class Adoption:
    """A live model server found in the state file at start-up."""

    key: ModelServerKey
    plan: LaunchPlan | None  # None: nothing can serve it any more, so it is to be stopped
    process: ServerProcess

    @property
    def servable(self) -> bool:
        return self.plan is not None


async def find_running_server(
    state_file: StateFile, plan_for: Callable[[str], LaunchPlan | None], port: int
) -> Adoption | None:
    """The live server the state file records (a proxy restart, or the loader CLI started it).
    A dead record is cleaned up. A live one is servable if its entry still exists and would be
    launched with the same command on this port, and it was not being stopped."""

    def read_live() -> ManagedState | None:
        with state_file.locked():
            return state_file.live()

    state = await asyncio.to_thread(read_live)
    if state is None:
        return None
    process = recorded_process(state)
    plan = plan_for(state.entry)
    command = state.requested_command  # a safe-mode start is still its entry's
    if plan is None or state.phase == "stopping" or state.port != port or plan.spec.argv != command:
        log.warning(
            "%s records %s (pid %d, %s) on port %d, which this proxy will not serve; stopping it",
            state_file.path,
            state.entry,
            state.pid,
            state.phase,
            state.port,
        )
        return Adoption(ModelServerKey(state.entry, command), None, process)
    log.info(
        "adopting %s (pid %d, %s) from %s", state.entry, state.pid, state.phase, state_file.path
    )
    return Adoption(plan.key, plan, process)


class ManagedBackend:
    """Entries whose server the proxy starts (llama.cpp, vLLM)."""

    def __init__(
        self,
        slot: Slot,
        plan_for: Callable[[RegistryEntry], LaunchPlan],
        idle_ttl: Callable[[RegistryEntry], float | None],
    ) -> None:
        self._slot = slot
        self._plan_for = plan_for
        self._idle_ttl = idle_ttl

    @asynccontextmanager
    async def lease(self, entry: RegistryEntry) -> AsyncIterator[Target]:
        wanted = self._plan_for(entry)
        async with self._slot.lease(wanted.key, wanted, idle_ttl_s=self._idle_ttl(entry)) as lease:
            plan = lease.plan
            if not isinstance(plan, LaunchPlan):  # cannot happen: the key names the plan
                raise BackendNotReady(f"{entry.name}: the GPU slot handed out {plan!r}")
            yield Target(
                base_url=f"http://{plan.spec.host}:{plan.spec.port}/v1",
                model=plan.entry.upstream_model_id,
                label=f"{plan.entry.backend}:{plan.entry.name}",
                preempted=lambda: lease.preempted,
                dialect=plan.spec.dialect,
                safe_mode=lease.holder.safe_mode,
            )


class OllamaBackend:
    """Ollama entries: the managed model server is stopped before Ollama is asked."""

    def __init__(self, slot: Slot, ollama_host: str, loopback_alias: str | None) -> None:
        self._slot = slot
        self._ollama_host = ollama_host
        self._loopback_alias = loopback_alias

    @asynccontextmanager
    async def lease(self, entry: RegistryEntry) -> AsyncIterator[Target]:
        target = external_target(entry, self._ollama_host, self._loopback_alias)
        plan = OllamaPlan(target.base_url.removesuffix("/v1"))
        async with self._slot.lease(plan.key, plan) as lease:
            yield Target(
                target.base_url, target.model, target.label, lambda: lease.preempted, target.dialect
            )
