"""The doctor's model check: one registry entry loads and answers one token (`max_tokens` 1; an
embedding entry: one embedding).

- A chat proxy answers on its port: the request goes through it, with the key the loader sends
  its admin endpoints, and the proxy loads the model as for any client (it stays loaded).
- Else, for an entry the loader can start (llama.cpp; vLLM with single-port orchestration), the
  model server is started as `activate-model` starts it (`activation.activate`: the GPU slot's
  own effects, owner "loader"), asked directly, and stopped again whatever happened. A server
  already running for this entry is asked and left running; a port held by anything else is
  reported and the check skipped.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from imageworks.backends.base import BackendNotReady
from imageworks.backends.endpoints import is_embedding_entry
from imageworks.backends.router import LaunchSettings, launch_spec
from imageworks.backends.state import ManagedState, StateFile
from imageworks.chat_proxy.config import ProxySettings
from imageworks.model_loader.activation import activate, stop
from imageworks.model_loader.doctor_ports import ModelPort
from imageworks.model_loader.doctor_report import Finding, fail, ok, warn
from imageworks.model_loader.errors import PROG, LoaderError
from imageworks.registry.naming import display_name
from imageworks.registry.paths import weights_path
from imageworks.registry.schema import RegistryEntry

NAME = "model"
_LOG_TAIL_MARK = "\n--- last log lines ---\n"  # how a failed start's message carries its log
_CONNECT_S = 5.0


@dataclass(frozen=True, slots=True)
class Setup:
    proxy: ProxySettings
    launches: LaunchSettings
    url: str | None  # the chat proxy answering on its port, if one does
    token: str | None  # the key the loader sends it
    port: ModelPort
    ollama_host: str | None  # the Ollama to ask to unload before a start (None: it is down)
    launcher_runs: bool  # the llama.cpp server passed its check


def is_chat_entry(entry: RegistryEntry) -> bool:
    return not is_embedding_entry(entry)


def weights_size(entry: RegistryEntry, registry_dir: Path) -> int:
    """The size of the entry's weights file (a directory, or none: larger than any file)."""
    path = weights_path(entry, registry_dir)
    try:
        return path.stat().st_size if path is not None and path.is_file() else 1 << 62
    except OSError:
        return 1 << 62


def check(entry: RegistryEntry | None, setup: Setup) -> Finding:
    if entry is None:
        fix = f"name one: `{PROG} doctor --model NAME`"
        return warn(NAME, "no installed llama.cpp chat entry to try", fix)
    label = display_name(entry)
    if setup.url is not None:
        return _through_proxy(entry, label, setup.url, setup)
    managed = entry.backend == "llamacpp" or (
        entry.backend == "vllm" and setup.proxy.vllm_single_port
    )
    if not managed:
        return warn(
            NAME,
            f"{label}: not tried: no proxy runs, and {PROG} does not start {entry.backend} models",
            "start the proxy (`imageworks-chat-proxy`) and run doctor again: it asks through it",
        )
    if entry.backend == "llamacpp" and not setup.launcher_runs:
        return warn(NAME, f"{label}: not tried: the llama.cpp server does not run (see above)")
    recorded = setup.port.recorded
    if recorded is not None and recorded.entry == entry.name and recorded.phase == "ready":
        return _ask_running(entry, label, recorded, setup)
    if recorded is not None:
        return warn(
            NAME,
            f"{label}: not tried: {recorded.entry} holds port {recorded.port}",
            f"stop it (`{PROG} activate-model --stop`), or check that one: "
            f"`{PROG} doctor --model '{recorded.entry}'`",
        )
    if not setup.port.free:
        return warn(
            NAME,
            f"{label}: not tried: port {setup.proxy.vllm_port} is taken ({setup.port.holder})",
            "free it (see the model port line)",
        )
    return _start_ask_stop(entry, label, setup)


def _through_proxy(entry: RegistryEntry, label: str, url: str, setup: Setup) -> Finding:
    # The proxy bounds the wait for its GPU slot (a swap: drain, stop, start) and the answer.
    settings = setup.proxy
    timeout = httpx.Timeout(
        settings.queue_timeout_s + settings.backend_timeout_s, connect=_CONNECT_S
    )
    started = time.monotonic()
    problem = _ask(url, entry, entry.name, setup.token, timeout)
    took = time.monotonic() - started
    if problem is not None:
        said, _, tail = problem.partition(_LOG_TAIL_MARK)
        fix = "that log says why" if "(log: " in said else "the proxy's output says why"
        finding = fail(NAME, f"{label}: through the proxy at {url}: {said}", fix, via=url)
        return _with_tail(finding, tail)
    what = _answered(entry)
    return ok(NAME, f"{label} {what} through the proxy at {url} in {took:.1f} s", via=url)


def _ask_running(entry: RegistryEntry, label: str, recorded: ManagedState, setup: Setup) -> Finding:
    started = time.monotonic()
    base = f"http://127.0.0.1:{recorded.port}"
    problem = _ask(base, entry, recorded.served_model_id, None, _direct_timeout(setup))
    took = time.monotonic() - started
    if problem is not None:
        return fail(NAME, f"{label} (already running): {problem}", _see(recorded.log_path))
    found = f"{label} {_answered(entry)} in {took:.1f} s (already running on port {recorded.port})"
    return ok(NAME, found, port=recorded.port, log=recorded.log_path)


def _start_ask_stop(entry: RegistryEntry, label: str, setup: Setup) -> Finding:
    log = _log_path(entry, setup.launches)
    started = time.monotonic()
    try:
        state = activate(entry, setup.proxy, setup.launches, setup.ollama_host)
    except LoaderError as exc:  # an ActivationError, with the server's log tail if it ran
        return _with_tail(
            fail(NAME, exc.problem, exc.fix or _see(log), log=log),
            getattr(exc, "log_tail", ""),
        )
    loaded = time.monotonic() - started
    try:
        base = f"http://127.0.0.1:{state.port}"
        problem = _ask(base, entry, state.served_model_id, None, _direct_timeout(setup))
        took = time.monotonic() - started - loaded
    finally:
        try:  # never leave it running: it was started for this check alone
            stop(StateFile(setup.proxy.vllm_state_path), setup.proxy.vllm_stop_timeout_s)
            unstopped = None
        except LoaderError as exc:
            unstopped = exc
    details: dict[str, Any] = {"port": state.port, "log": state.log_path}
    if problem is not None:
        return fail(NAME, f"{label} loaded, but {problem}", _see(state.log_path), **details)
    if unstopped is not None:
        return fail(NAME, f"{label} answered, then could not be stopped: {unstopped}", **details)
    found = (
        f"{label} loaded in {loaded:.1f} s and {_answered(entry)} in {took:.1f} s "
        f"(port {state.port}; stopped again)"
    )
    return ok(NAME, found, **details)


def _ask(
    base: str, entry: RegistryEntry, model: str, token: str | None, timeout: httpx.Timeout
) -> str | None:
    """One chat completion of one token (an embedding entry: one embedding) from the server at
    `base`; None when it answered, else what happened instead."""
    body: dict[str, Any]
    if is_embedding_entry(entry):
        path, body, key = "/v1/embeddings", {"model": model, "input": "ping"}, "data"
    else:
        messages = [{"role": "user", "content": "ping"}]
        path, key = "/v1/chat/completions", "choices"
        body = {"model": model, "messages": messages, "max_tokens": 1, "stream": False}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(
            base + path, json=body, headers=headers, timeout=timeout, trust_env=False
        )
    except httpx.HTTPError as exc:
        return f"POST {path} got no answer ({type(exc).__name__})"
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        said = error.get("message") if isinstance(error, dict) else None
        return f"POST {path} answered HTTP {response.status_code}: {said or response.text[:200]}"
    items = answer.get(key) if isinstance(answer, dict) else None
    if not isinstance(items, list) or not items:
        return f"POST {path} answered without {key}"
    return None


def _answered(entry: RegistryEntry) -> str:
    return "answered an embedding" if is_embedding_entry(entry) else "answered one token"


def _direct_timeout(setup: Setup) -> httpx.Timeout:
    return httpx.Timeout(setup.proxy.backend_timeout_s, connect=_CONNECT_S)


def _log_path(entry: RegistryEntry, launches: LaunchSettings) -> str | None:
    try:
        return str(launch_spec(entry, launches).log_path)
    except BackendNotReady:  # it cannot even be launched; the start says why
        return None


def _see(log: str | None) -> str | None:
    return f"its log {log} says why" if log else None


def _with_tail(finding: Finding, tail: str) -> Finding:
    return dataclasses.replace(finding, log_tail=tail) if tail.strip() else finding
