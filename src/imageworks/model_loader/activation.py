"""`activate-model` and `current-model`, with or without a running proxy.

With a proxy on the configured address, its admin endpoints do the work, so its GPU slot stays
in charge. Without one, the loader runs the slot's own effects (`backends.managed.GpuEffects`):
it stops the recorded model server, asks Ollama to unload, starts the new server (which outlives
this command) and records it, from the moment it spawns, for the next proxy to adopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx

from imageworks.backends.base import BackendNotReady
from imageworks.backends.managed import GpuEffects, LaunchPlan
from imageworks.backends.ollama import OllamaManager
from imageworks.backends.router import LaunchSettings, launch_spec
from imageworks.backends.state import ManagedState, StateFile, recorded_process
from imageworks.backends.supervisor import ProcessSurvived
from imageworks.chat_proxy.config import ProxySettings
from imageworks.registry.schema import RegistryEntry


class ActivationError(Exception):
    """Activation or stopping failed; the message says why (and shows the log tail)."""


def proxy_url(settings: ProxySettings) -> str | None:
    """The running proxy's base URL, or None if none answers on the configured address."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}"
    try:
        response = httpx.get(f"{url}/v1/health", timeout=1.0, trust_env=False)
    except httpx.HTTPError:
        return None
    return url if response.is_success and "slot" in response.json() else None


def via_proxy(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    try:
        response = httpx.request(method, f"{url}{path}", json=body, timeout=None, trust_env=False)
    except httpx.HTTPError as exc:
        raise ActivationError(f"the proxy at {url} did not answer: {exc}") from exc
    payload = response.json()
    if not response.is_success:
        raise ActivationError(payload.get("error", {}).get("message", response.text))
    return payload


def current(state_file: StateFile) -> ManagedState | None:
    with state_file.locked():
        return state_file.live()


def stop(state_file: StateFile, stop_timeout_s: float) -> ManagedState | None:
    """Stop the recorded model server, if one runs; returns what was stopped."""
    return asyncio.run(_stop(state_file, stop_timeout_s))


async def _stop(state_file: StateFile, stop_timeout_s: float) -> ManagedState | None:
    running = await asyncio.to_thread(current, state_file)
    if running is None:
        return None
    # Stopping a model server asks nothing of Ollama, so no Ollama address is needed.
    async with _effects(state_file, None, start_timeout_s=0, stop_timeout_s=stop_timeout_s) as fx:
        await _stop_recorded(fx, running)
    return running


def activate(
    entry: RegistryEntry, settings: ProxySettings, launches: LaunchSettings, ollama_host: str
) -> ManagedState:
    """Start `entry`'s server (stopping another one first) and record it; no proxy involved.
    The same effects as the proxy's GPU slot: the record is written as the process spawns, a
    failed start kills what it spawned, and Ollama is asked to unload first."""
    try:
        plan = LaunchPlan(entry, launch_spec(entry, launches))
    except BackendNotReady as exc:
        raise ActivationError(str(exc)) from exc
    state_file = StateFile(settings.vllm_state_path)
    return asyncio.run(_activate(plan, state_file, settings, ollama_host))


async def _activate(
    plan: LaunchPlan, state_file: StateFile, settings: ProxySettings, ollama_host: str
) -> ManagedState:
    timeouts = {
        "start_timeout_s": settings.vllm_start_timeout_s,
        "stop_timeout_s": settings.vllm_stop_timeout_s,
    }
    async with _effects(state_file, ollama_host, **timeouts) as effects:
        running = await asyncio.to_thread(current, state_file)
        if running is not None:
            if running.entry == plan.entry.name and tuple(running.command) == plan.spec.argv:
                return running
            await _stop_recorded(effects, running)
        try:
            # The process outlives this command: spawn uses Popen, which nothing kills at exit.
            await effects.start(plan.key, plan)
        except BackendNotReady as exc:
            raise ActivationError(str(exc)) from exc
    started = await asyncio.to_thread(current, state_file)
    if started is None:
        raise ActivationError(f"{plan.entry.name} started but exited at once")
    return started


async def _stop_recorded(effects: GpuEffects, running: ManagedState) -> None:
    try:
        await effects.stop(recorded_process(running))
    except ProcessSurvived as exc:
        raise ActivationError(str(exc)) from exc


@contextlib.asynccontextmanager
async def _effects(
    state_file: StateFile,
    ollama_host: str | None,
    *,
    start_timeout_s: float,
    stop_timeout_s: float,
) -> AsyncIterator[GpuEffects]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield GpuEffects(
            state_file,
            lambda root: OllamaManager(root, client),
            ollama_host,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
            owner="loader",
        )


def state_json(state: ManagedState | None) -> dict[str, Any] | None:
    return dataclasses.asdict(state) if state else None
