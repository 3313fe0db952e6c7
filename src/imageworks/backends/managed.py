"""Entries whose server the proxy starts itself (llama.cpp, vLLM): every lease goes through the
GPU slot, which starts, swaps and stops `ManagedProcess`es on the single managed port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from imageworks.backends.base import BackendNotReady, Target
from imageworks.backends.gpu import GpuSlot
from imageworks.backends.supervisor import LaunchSpec, ManagedProcess, StartError
from imageworks.registry.schema import RegistryEntry


class ProcessEffects:
    """The slot's effects for model servers: start one process, stop one process."""

    def __init__(
        self,
        launch_spec: Callable[[str], LaunchSpec],
        *,
        start_timeout_s: float,
        stop_timeout_s: float,
    ) -> None:
        self._launch_spec = launch_spec
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s

    async def start(self, model: str) -> ManagedProcess:
        process = ManagedProcess(self._launch_spec(model))
        try:
            await process.start(self._start_timeout_s)
        except StartError as exc:
            raise BackendNotReady(f"{model} could not be started: {exc}") from exc
        return process

    async def stop(self, holder: ManagedProcess) -> None:
        await holder.stop(self._stop_timeout_s)


class ManagedBackend:
    def __init__(self, slot: GpuSlot[ManagedProcess]) -> None:
        self._slot = slot

    @asynccontextmanager
    async def lease(self, entry: RegistryEntry) -> AsyncIterator[Target]:
        async with self._slot.lease(entry.name) as process:
            spec = process.spec
            yield Target(
                base_url=f"http://{spec.host}:{spec.port}/v1",
                model=entry.upstream_model_id,
                label=f"{entry.backend}:{entry.name}",
            )
