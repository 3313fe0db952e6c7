"""`activate-model` and `current-model`, with or without a running proxy.

With a proxy on the configured address, its admin endpoints do the work, so its GPU slot stays
in charge. Without one, the loader does what the slot would: under the state file's lock it
stops the recorded model server, asks Ollama to unload, starts the new server detached (it must
outlive this command) and records it for the next proxy to adopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from imageworks.backends.base import BackendNotReady
from imageworks.backends.ollama import OllamaManager, OllamaUnavailable
from imageworks.backends.procfs import process_start_ticks
from imageworks.backends.router import LaunchSettings, launch_spec
from imageworks.backends.state import AdoptedProcess, ManagedState, StateFile
from imageworks.backends.supervisor import LaunchSpec, ManagedProcess, port_in_use
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
    with state_file.locked():
        state = state_file.live()
        if state is not None:
            asyncio.run(AdoptedProcess(state).stop(stop_timeout_s))
            state_file.clear()
        return state


def activate(
    entry: RegistryEntry, settings: ProxySettings, launches: LaunchSettings, ollama_host: str
) -> ManagedState:
    """Start `entry`'s server (stopping another one first) and record it; no proxy involved."""
    try:
        spec = launch_spec(entry, launches)
    except BackendNotReady as exc:
        raise ActivationError(str(exc)) from exc
    state_file = StateFile(settings.vllm_state_path)
    with state_file.locked():
        running = state_file.live()
        if running is not None and running.entry == entry.name:
            return running
        if running is not None:
            asyncio.run(AdoptedProcess(running).stop(settings.vllm_stop_timeout_s))
            state_file.clear()
        asyncio.run(_unload_ollama(ollama_host))
        state = _start_detached(entry, spec, settings.vllm_start_timeout_s)
        state_file.write(state)
        return state


async def _unload_ollama(root: str) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        # An Ollama we cannot reach holds nothing we could free.
        with contextlib.suppress(OllamaUnavailable):
            await OllamaManager(root, client).unload_all()


def _start_detached(entry: RegistryEntry, spec: LaunchSpec, timeout_s: float) -> ManagedState:
    """Popen, not asyncio: an asyncio child is killed when its event loop closes, and this
    one has to outlive the command."""
    if asyncio.run(port_in_use(spec.host, spec.port)):
        raise ActivationError(f"port {spec.port} is already in use on {spec.host}")
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with spec.log_path.open("ab") as log:
        log.write(f"\n===== {datetime.now(UTC).isoformat()} imageworks-loader: starting\n".encode())
        log.flush()
        process = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **spec.env},
            cwd=spec.cwd,
        )
    if not _wait_healthy(process, spec, timeout_s):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        tail = ManagedProcess(spec).log_tail()
        raise ActivationError(
            f"{entry.name} did not start (exit code {process.returncode}); "
            f"log {spec.log_path}:\n{tail}"
        )
    ticks = process_start_ticks(process.pid)
    assert ticks is not None  # it just answered its health check
    return ManagedState(
        entry=entry.name,
        served_model_id=entry.upstream_model_id,
        backend=entry.backend,
        port=spec.port,
        pid=process.pid,
        process_start=ticks,
        command=list(spec.argv),
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        log_path=str(spec.log_path),
        owner="loader",
    )


def _wait_healthy(process: subprocess.Popen[bytes], spec: LaunchSpec, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    base = f"http://{spec.host}:{spec.port}"
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while time.monotonic() < deadline and process.poll() is None:
            for path in spec.health_paths:
                try:
                    if client.get(base + path).is_success:
                        return True
                except httpx.HTTPError:
                    continue
            time.sleep(0.1)
    return False


def state_json(state: ManagedState | None) -> dict[str, Any] | None:
    return dataclasses.asdict(state) if state else None
