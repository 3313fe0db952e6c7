"""`activate-model` and `current-model`, with or without a running proxy.

With a proxy on the configured address, its admin endpoints do the work, so its GPU slot stays
in charge. Without one, the loader runs the slot's own effects (`backends.managed.GpuEffects`):
it stops the recorded model server, asks Ollama to unload, starts the new server (which outlives
this command) and records it, from the moment it spawns, for the next proxy to adopt.

Every request to the proxy carries the admin key (else an API key) as a Bearer token, the open
`/v1/health` that finds it included, and every POST a JSON body. Every failure is a
`LoaderError` (`errors.py`) whose message ends with what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from imageworks.backends.base import BackendNotReady
from imageworks.backends.managed import GpuEffects, LaunchPlan
from imageworks.backends.ollama import OllamaError, OllamaManager
from imageworks.backends.router import LaunchSettings, launch_spec
from imageworks.backends.safe_mode import SafeModeMemory
from imageworks.backends.state import ManagedState, StateFile, StateLockTimeout, recorded_process
from imageworks.backends.supervisor import ProcessSurvived, StartError
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.launching import safe_mode_memory
from imageworks.model_loader.errors import PROG, ActivationError, LoaderError
from imageworks.registry.schema import RegistryEntry

STATE_FIX = "check CHAT_PROXY_VLLM_STATE_PATH (its directory must be writable)"
KEY_FIX = "set CHAT_PROXY_ADMIN_KEY to the proxy's admin key"
_STUCK_FIX = "it is stuck in the kernel: retry once it has exited (a reboot ends it)"
_CONNECT_TIMEOUT_S = 5.0
# Activating waits for the proxy's GPU slot and the model's start, both bounded by the proxy.
_ADMIN_TIMEOUT = httpx.Timeout(None, connect=_CONNECT_TIMEOUT_S)


# -- through the running proxy -------------------------------------------------------------------


def admin_token(settings: ProxySettings) -> str | None:
    """The key for the proxy's admin endpoints: the admin key, else an API key (the proxy takes
    any of those when no admin key is set), else None (a proxy without keys)."""
    if settings.admin_key:
        return settings.admin_key
    return min(settings.api_keys) if settings.api_keys else None


def proxy_url(settings: ProxySettings) -> str | None:
    """The running proxy's base URL, or None if no chat proxy answers on the configured address.
    LoaderError when it answers but refuses the loader's key."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"
    token = admin_token(settings)
    try:
        response = httpx.get(f"{url}/v1/health", headers=_auth(token), timeout=1.0, trust_env=False)
    except httpx.HTTPError:  # nothing listens there
        return None
    if response.status_code in (401, 403):  # a proxy that guards its health too
        raise _refused(url, response.status_code, token)
    try:
        body = response.json()
    except ValueError:  # something that is not the proxy
        return None
    return url if response.is_success and isinstance(body, dict) and "slot" in body else None


def via_proxy(
    url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
) -> dict[str, Any]:
    """Call an admin endpoint; its JSON answer, or LoaderError (ActivationError when the proxy
    could not do it). Every non-GET request carries a JSON body (`{}` when there is nothing)."""
    payload = None if method == "GET" else (body or {})
    try:
        response = httpx.request(
            method,
            f"{url}{path}",
            json=payload,
            headers=_auth(token),
            timeout=_ADMIN_TIMEOUT,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        raise LoaderError(
            f"the proxy at {url} did not answer {method} {path}: "
            f"{str(exc).rstrip('.') or type(exc).__name__}",
            "check that it is still running (start it with `imageworks-chat-proxy`), then retry",
        ) from exc
    if response.status_code in (401, 403):
        raise _refused(url, response.status_code, token)
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise LoaderError(
            f"{url}{path} answered HTTP {response.status_code} without a JSON object",
            "check that CHAT_PROXY_HOST and CHAT_PROXY_PORT point at the chat proxy",
        )
    if not response.is_success:
        raise _proxy_failed(url, path, response.status_code, answer)
    return answer


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _refused(url: str, status: int, token: str | None) -> LoaderError:
    if token is None:
        problem = f"the proxy at {url} wants a key for its admin endpoints (HTTP {status})"
    elif status == 403:
        problem = f"the proxy at {url} refused the key sent: it is not its admin key (HTTP 403)"
    else:
        problem = f"the proxy at {url} did not accept the key sent (HTTP 401)"
    return LoaderError(problem, KEY_FIX)


def _proxy_failed(url: str, path: str, status: int, answer: dict[str, Any]) -> LoaderError:
    error = answer.get("error")
    said = error.get("message") if isinstance(error, dict) else None
    # A failed start's message is one line, then (StartError's format) the model server's log.
    first, _, rest = str(said or f"HTTP {status}").strip().partition("\n")
    tail = "\n".join(line for line in rest.splitlines() if not line.startswith("--- "))
    problem = f"the proxy at {url} answered HTTP {status}: {first.strip()}"
    if status == 404 and path.endswith("/activate"):
        fix = f"run `{PROG} list` to see the names it serves"
    elif "(log: " in first:
        fix = "that log says why"
    else:
        fix = "the proxy's output says why"
    return ActivationError(problem, fix, log_tail=tail)


# -- without a proxy: the state file and the slot's own effects ----------------------------------


def current(state_file: StateFile) -> ManagedState | None:
    """The recorded model server if it still runs; LoaderError if the state file is unusable."""
    try:
        with state_file.locked():
            return state_file.live()
    except StateLockTimeout as exc:
        raise LoaderError(str(exc), f"wait for it to finish, then retry; or {STATE_FIX}") from exc
    except OSError as exc:
        raise _state_unusable(state_file.path, exc) from exc


def _state_unusable(path: Path, exc: OSError) -> LoaderError:
    # The error may be about a directory on the way (a file where the directory should be).
    where = f"{exc.filename}: " if exc.filename and str(exc.filename) != str(path) else ""
    return LoaderError(f"cannot use the state file {path}: {where}{exc.strerror or exc}", STATE_FIX)


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
    entry: RegistryEntry,
    settings: ProxySettings,
    launches: LaunchSettings,
    ollama_host: str | None,
) -> ManagedState:
    """Start `entry`'s server (stopping another one first) and record it; no proxy involved.
    The same effects as the proxy's GPU slot: the record is written as the process spawns, a
    failed start kills what it spawned, and Ollama (`ollama_host`; None: none to ask) is asked
    to unload first."""
    try:
        plan = LaunchPlan(entry, launch_spec(entry, launches))
    except BackendNotReady as exc:  # a launch setting (named in the message) or the entry
        fix = (
            "correct that variable"
            if "CHAT_PROXY_" in str(exc)
            else f"check the entry with `{PROG} show {entry.name}`"
        )
        raise ActivationError(str(exc), fix) from exc
    state_file = StateFile(settings.vllm_state_path)
    return asyncio.run(_activate(plan, state_file, settings, ollama_host))


async def _activate(
    plan: LaunchPlan, state_file: StateFile, settings: ProxySettings, ollama_host: str | None
) -> ManagedState:
    timeouts = {
        "start_timeout_s": settings.vllm_start_timeout_s,
        "stop_timeout_s": settings.vllm_stop_timeout_s,
    }
    memory = safe_mode_memory(settings)
    async with _effects(state_file, ollama_host, **timeouts, safe_mode=memory) as effects:
        running = await asyncio.to_thread(current, state_file)
        if running is not None:
            if running.entry == plan.entry.name and running.requested_command == plan.spec.argv:
                return running
            await _stop_recorded(effects, running)
        try:
            # The process outlives this command: spawn uses Popen, which nothing kills at exit.
            await effects.start(plan.key, plan)
        except BackendNotReady as exc:
            raise _start_failed(exc, plan) from exc
    started = await asyncio.to_thread(current, state_file)
    if started is None:
        raise ActivationError(
            f"{plan.entry.name} started but exited at once", f"see its log {plan.spec.log_path}"
        )
    return started


def _start_failed(exc: BackendNotReady, plan: LaunchPlan) -> ActivationError:
    cause, name = exc.__cause__, plan.entry.name
    if isinstance(cause, StartError):
        # Its reason names the log when the server ran; a port held by a stranger says the fix.
        problem = f"{name} could not be started: {cause.reason}"
        if "(log: " in cause.reason:
            fix: str | None = "that log says why"
        else:
            fix = f"see its log {plan.spec.log_path}" if cause.log_tail else None
        return ActivationError(problem, fix, log_tail=cause.log_tail)
    if isinstance(cause, ProcessSurvived):
        return ActivationError(str(exc), _STUCK_FIX)
    if isinstance(cause, OSError):  # the state file could not be written (the start was undone)
        return ActivationError(str(exc), STATE_FIX)
    if isinstance(exc, OllamaError):
        return ActivationError(str(exc), "check Ollama (`ollama ps`) at IMAGEWORKS_OLLAMA_HOST")
    return ActivationError(str(exc), f"check the entry with `{PROG} show {name}`")


async def _stop_recorded(effects: GpuEffects, running: ManagedState) -> None:
    try:
        await effects.stop(recorded_process(running))
    except ProcessSurvived as exc:
        raise ActivationError(str(exc), _STUCK_FIX) from exc
    except PermissionError as exc:  # the record's process runs as another user
        raise ActivationError(
            f"{running.entry}: cannot signal pid {running.pid}: {exc.strerror}",
            "stop it as the user it runs as",
        ) from exc


@contextlib.asynccontextmanager
async def _effects(
    state_file: StateFile,
    ollama_host: str | None,
    *,
    start_timeout_s: float,
    stop_timeout_s: float,
    safe_mode: SafeModeMemory | None = None,
) -> AsyncIterator[GpuEffects]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield GpuEffects(
            state_file,
            lambda root: OllamaManager(root, client),
            ollama_host,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
            owner="loader",
            safe_mode=safe_mode,
        )


def state_json(state: ManagedState | None) -> dict[str, Any] | None:
    return dataclasses.asdict(state) if state else None
