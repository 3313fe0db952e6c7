"""What holds the GPU, and the effects the slot uses to change it.

Holders are a model server we start (`ManagedProcess`), one we found running (`AdoptedProcess`,
from the state file), or Ollama (`OllamaHolder`: whatever Ollama keeps loaded). Before a model
server starts, Ollama is asked to unload everything; before Ollama serves, the model server is
stopped. The state file always describes the running model server, so a restarted proxy or the
loader CLI finds it instead of orphaning it.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import httpx

from imageworks.backends.base import BackendNotReady, Target
from imageworks.backends.external import external_target
from imageworks.backends.gpu import GpuSlot
from imageworks.backends.ollama import OllamaManager, OllamaUnavailable
from imageworks.backends.procfs import process_start_ticks
from imageworks.backends.state import AdoptedProcess, ManagedState, StateFile
from imageworks.backends.supervisor import LaunchSpec, ManagedProcess, StartError
from imageworks.registry.schema import RegistryEntry

log = logging.getLogger("imageworks.backends.managed")

OLLAMA_PREFIX = "@ollama "  # the slot's name for "the Ollama at <url> holds the GPU"


def ollama_holder_key(root_url: str) -> str:
    return OLLAMA_PREFIX + root_url


class OllamaHolder:
    """Ollama as the GPU's holder: it loads and unloads its own models."""

    pid = None

    def __init__(self, manager: OllamaManager) -> None:
        self.manager = manager

    def is_alive(self) -> bool:
        return True


GpuHolder = ManagedProcess | AdoptedProcess | OllamaHolder


class GpuEffects:
    """The slot's effects: start and stop holders, keeping Ollama and the state file in step."""

    def __init__(
        self,
        launch_spec: Callable[[str], tuple[LaunchSpec, RegistryEntry]],
        state_file: StateFile,
        ollama: Callable[[str], OllamaManager],
        default_ollama: str,
        *,
        start_timeout_s: float,
        stop_timeout_s: float,
    ) -> None:
        self._launch_spec = launch_spec
        self._state_file = state_file
        self._ollama = ollama
        # Every Ollama that may hold VRAM: the default one and any an entry has used.
        self._ollama_roots = {default_ollama.rstrip("/")}
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s

    async def start(self, model: str) -> GpuHolder:
        if model.startswith(OLLAMA_PREFIX):
            root = model.removeprefix(OLLAMA_PREFIX)
            self._ollama_roots.add(root)
            manager = self._ollama(root)
            await manager.version()  # unreachable: a 503 for Ollama entries, and no swap
            return OllamaHolder(manager)
        spec, entry = self._launch_spec(model)
        await self._free_ollama_vram()
        process = ManagedProcess(spec)
        try:
            await process.start(self._start_timeout_s)
        except StartError as exc:
            raise BackendNotReady(f"{model} could not be started: {exc}") from exc
        await asyncio.to_thread(self._record, process, entry)
        return process

    async def stop(self, holder: GpuHolder) -> None:
        if isinstance(holder, OllamaHolder):
            await self._free_ollama_vram()
            return
        await holder.stop(self._stop_timeout_s)
        await asyncio.to_thread(self._forget, holder.pid)

    async def _free_ollama_vram(self) -> None:
        for root in sorted(self._ollama_roots):
            try:
                await self._ollama(root).unload_all()
            except OllamaUnavailable as exc:
                # An Ollama we cannot reach holds nothing we could free; it must not block vLLM.
                log.info("Ollama not reachable, nothing to unload: %s", exc)

    def _record(self, process: ManagedProcess, entry: RegistryEntry) -> None:
        pid = process.pid
        ticks = process_start_ticks(pid) if pid is not None else None
        if pid is None or ticks is None:
            return  # it died right after becoming ready; the next request restarts it
        state = ManagedState(
            entry=entry.name,
            served_model_id=entry.upstream_model_id,
            backend=entry.backend,
            port=process.spec.port,
            pid=pid,
            process_start=ticks,
            command=list(process.spec.argv),
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            log_path=str(process.spec.log_path),
            owner="proxy",
        )
        with self._state_file.locked():
            self._state_file.write(state)
        log.info("started %s (pid %d): %s", entry.name, pid, shlex.join(process.spec.argv))

    def _forget(self, pid: int | None) -> None:
        with self._state_file.locked():
            recorded = self._state_file.read()
            if recorded is None or recorded.pid == pid:
                self._state_file.clear()


async def adopt_running_model(
    state_file: StateFile,
    known: Callable[[str], bool],
    port: int,
    *,
    stop_timeout_s: float,
    health_timeout_s: float,
    client: httpx.AsyncClient,
) -> tuple[str, AdoptedProcess] | None:
    """The live model server the state file records (a proxy restart, or the loader CLI
    started it), to be the slot's holder. A dead record is cleaned up; a live one this proxy
    cannot serve (entry gone, other port, no answer to a health call within
    `health_timeout_s`) is stopped rather than left holding the GPU."""

    def read_live() -> ManagedState | None:
        with state_file.locked():
            return state_file.live()

    state = await asyncio.to_thread(read_live)
    if state is None:
        return None
    process = AdoptedProcess(state)
    servable = known(state.entry) and state.port == port
    if servable and await _answers_health(process, client, health_timeout_s):
        log.info("adopting %s (pid %d) from %s", state.entry, state.pid, state_file.path)
        return state.entry, process
    log.warning(
        "%s records %s on port %d, which this proxy cannot serve or which does not answer; "
        "stopping it",
        state_file.path,
        state.entry,
        state.port,
    )
    await process.stop(stop_timeout_s)

    def clear() -> None:
        with state_file.locked():
            state_file.clear()

    await asyncio.to_thread(clear)
    return None


async def _answers_health(
    process: AdoptedProcess, client: httpx.AsyncClient, timeout_s: float
) -> bool:
    base = f"http://{process.spec.host}:{process.spec.port}"
    for path in process.spec.health_paths:
        try:
            response = await client.get(base + path, timeout=timeout_s)
        except httpx.HTTPError:
            continue
        if response.is_success:
            return True
    return False


class ManagedBackend:
    """Entries whose server the proxy starts (llama.cpp, vLLM)."""

    def __init__(self, slot: GpuSlot[GpuHolder]) -> None:
        self._slot = slot

    @asynccontextmanager
    async def lease(self, entry: RegistryEntry) -> AsyncIterator[Target]:
        async with self._slot.lease(entry.name) as lease:
            holder = lease.holder
            if isinstance(holder, OllamaHolder):  # cannot happen: the key is the entry name
                raise BackendNotReady(f"{entry.name}: the GPU slot handed out Ollama")
            spec = holder.spec
            yield Target(
                base_url=f"http://{spec.host}:{spec.port}/v1",
                model=entry.upstream_model_id,
                label=f"{entry.backend}:{entry.name}",
                preempted=lambda: lease.preempted,
            )


class OllamaBackend:
    """Ollama entries: the managed model server is stopped before Ollama is asked."""

    def __init__(
        self, slot: GpuSlot[GpuHolder], ollama_host: str, loopback_alias: str | None
    ) -> None:
        self._slot = slot
        self._ollama_host = ollama_host
        self._loopback_alias = loopback_alias

    @asynccontextmanager
    async def lease(self, entry: RegistryEntry) -> AsyncIterator[Target]:
        target = external_target(entry, self._ollama_host, self._loopback_alias)
        key = ollama_holder_key(target.base_url.removesuffix("/v1"))
        async with self._slot.lease(key) as lease:
            yield Target(target.base_url, target.model, target.label, lambda: lease.preempted)
