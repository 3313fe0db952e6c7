"""`imageworks-loader doctor`: what a new user needs, checked in a few seconds, one line each.

In order: the registry parses; the settings parse; the llama.cpp server runs, and vLLM's
launcher when an installed entry needs it; the GPU; Ollama when the registry has Ollama entries
or IMAGEWORKS_OLLAMA_HOST is set (`doctor_programs.py`); the proxy's port and the managed model
port are free, or whose they are (`doctor_ports.py`); and last, a model answers one token
(`doctor_model.py`): the one named with `--model`, else the model already loaded on the model
port, else the smallest installed llama.cpp chat entry (the quickest to load).

Every check that waits on another program or the network is bounded by a short timeout; only
the model check takes a second or more. A broken registry or setting is a finding, not the end
of the command: the checks that do not need it still run. Exit status 1 when a check failed; a
`--model` that names nothing is the loader's usual one-line error instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from typing import TextIO

import httpx

from imageworks.backends.ollama import OllamaError, OllamaManager
from imageworks.chat_proxy.config import ProxySettings, SettingsError, load_settings
from imageworks.chat_proxy.launching import launch_settings
from imageworks.config import RegistrySettings
from imageworks.model_loader import doctor_model, doctor_ports, doctor_programs
from imageworks.model_loader import doctor_report as report
from imageworks.model_loader.activation import admin_token
from imageworks.model_loader.doctor_ports import ModelPort
from imageworks.model_loader.doctor_report import Finding, Status, fail, ok, warn
from imageworks.registry.endpoints import backend_root
from imageworks.registry.errors import RegistryError
from imageworks.registry.installed import Installed, installed_states
from imageworks.registry.naming import NameIndex
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.store import RegistrySnapshot, RegistryStore

_OLLAMA_TIMEOUT_S = 2.0


def doctor(
    args: argparse.Namespace, store: RegistryStore, settings: RegistrySettings, out: TextIO
) -> int:
    started = time.monotonic()
    findings, snapshot = [_registry(store)], _snapshot(store)
    named = NameIndex(snapshot.entries).resolve(args.model) if snapshot and args.model else None
    try:
        proxy = load_settings()
    except SettingsError as exc:
        findings.append(fail("settings", str(exc), "correct that variable or unset it"))
    else:
        findings += _environment(proxy, store, snapshot, settings, named)
    seconds = time.monotonic() - started
    if args.json:
        json.dump(report.document(findings, seconds), out, indent=2)
        out.write("\n")
    else:
        out.write(report.text(findings, seconds))
    return 1 if report.failed(findings) else 0


def _environment(
    proxy: ProxySettings,
    store: RegistryStore,
    snapshot: RegistrySnapshot | None,
    settings: RegistrySettings,
    named: RegistryEntry | None,
) -> list[Finding]:
    entries = snapshot.entries if snapshot is not None else ()
    installed = _installed(snapshot, settings)
    launches = launch_settings(proxy, store.directory)
    servable = {e.backend for e in entries if installed.get(e.name) is Installed.YES}
    launcher = doctor_programs.llamacpp(launches.llamacpp, proxy, needed="llamacpp" in servable)
    findings = [launcher]
    if "vllm" in servable and proxy.vllm_single_port:
        findings.append(doctor_programs.vllm(launches.vllm_launcher))
    findings.append(doctor_programs.gpu())
    ollamas = _ollama(entries, settings)
    proxy_finding, url = doctor_ports.proxy_port(proxy)
    port_finding, port = doctor_ports.model_port(proxy)
    findings += [*ollamas, proxy_finding, port_finding]
    if snapshot is None:
        findings.append(warn("model", "not tried: the registry cannot be read (see above)"))
    elif proxy_finding.details.get("refused"):
        findings.append(warn("model", "not tried: the proxy refuses the loader's key (see above)"))
    else:
        default = settings.ollama_host.rstrip("/")
        down = any(f.details.get("url") == default and f.status is not Status.OK for f in ollamas)
        setup = doctor_model.Setup(
            proxy=proxy,
            launches=launches,
            url=url,
            token=admin_token(proxy),
            port=port,
            ollama_host=None if down else settings.ollama_host,  # a dead one holds nothing
            launcher_runs=launcher.status is Status.OK,
        )
        entry = named or _default_model(snapshot, installed, port)
        findings.append(doctor_model.check(entry, setup))
    return findings


# -- the registry ---------------------------------------------------------------------------------


def _registry(store: RegistryStore) -> Finding:
    try:
        snapshot = store.load()
    except RegistryError as exc:
        layers = (store.curated_path, store.discovered_path, store.merged_path)
        if any(path.exists() for path in layers):
            return fail("registry", str(exc), "correct that file, then retry")
        fix = "point --registry-dir or IMAGEWORKS_REGISTRY_DIR at the registry directory"
        return fail("registry", str(exc), fix)
    files = sorted({path.name for paths in snapshot.sources.values() for path in paths})
    found = f"{store.directory}: {_count(len(snapshot), 'entry', 'entries')}"
    found += f" ({', '.join(files)})" if files else ""
    details = {"directory": str(store.directory), "entries": len(snapshot)}
    if snapshot.warnings:
        skipped = _count(len(snapshot.warnings), "entry", "entries")
        return warn(
            "registry",
            f"{found}; {skipped} skipped: {snapshot.warnings[0]}",
            "correct it (the others are served)",
            **details,
            warnings=list(snapshot.warnings),
        )
    return ok("registry", found, **details)


def _snapshot(store: RegistryStore) -> RegistrySnapshot | None:
    try:
        return store.load()  # the store's cache: the registry check has just read it
    except RegistryError:
        return None


def _installed(
    snapshot: RegistrySnapshot | None, settings: RegistrySettings
) -> dict[str, Installed]:
    """Which entries have their weights here (Ollama's are UNKNOWN: it has its own check)."""
    if snapshot is None:
        return {}
    served = [entry for entry in snapshot.entries if not entry.deprecated]
    return installed_states(served, snapshot.directory, None, settings.ollama_host)


def _default_model(
    snapshot: RegistrySnapshot, installed: dict[str, Installed], port: ModelPort
) -> RegistryEntry | None:
    """The model already loaded (asking it swaps nothing), else the smallest installed
    llama.cpp chat entry: the quickest to load (SmolLM2 in the demo registry)."""
    loaded = snapshot.get(port.recorded.entry) if port.recorded is not None else None
    if loaded is not None and doctor_model.is_chat_entry(loaded):
        return loaded
    candidates = [
        entry
        for entry in snapshot.entries
        if entry.backend == "llamacpp"
        and installed.get(entry.name) is Installed.YES
        and doctor_model.is_chat_entry(entry)
    ]
    size = doctor_model.weights_size
    return min(candidates, key=lambda e: (size(e, snapshot.directory), e.name), default=None)


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


# -- Ollama ---------------------------------------------------------------------------------------


def _ollama(entries: Sequence[RegistryEntry], settings: RegistrySettings) -> list[Finding]:
    """Each Ollama the registry's entries use, and the configured one if IMAGEWORKS_OLLAMA_HOST
    is set: does it answer GET /api/version? One that does not is a warning: only its entries
    are affected."""
    default = settings.ollama_host.rstrip("/")
    users: dict[str, list[str]] = {}
    if "ollama_host" in settings.model_fields_set:  # set in the environment
        users[default] = []
    for entry in entries:
        if entry.backend == "ollama" and not entry.deprecated:
            users.setdefault(backend_root(entry, settings.ollama_host), []).append(entry.name)
    if not users:
        return []
    return asyncio.run(_ask_ollamas(users, default))


async def _ask_ollamas(users: dict[str, list[str]], default: str) -> list[Finding]:
    async with httpx.AsyncClient(trust_env=False) as client:
        asks = (_ask_ollama(client, root, names, default) for root, names in users.items())
        return list(await asyncio.gather(*asks))


async def _ask_ollama(
    client: httpx.AsyncClient, root: str, names: list[str], default: str
) -> Finding:
    users = _count(len(names), "registry entry uses", "registry entries use")
    try:
        version = await OllamaManager(root, client, request_timeout_s=_OLLAMA_TIMEOUT_S).version()
    except OllamaError as exc:
        if root == default:
            fix = "start it (`ollama serve`), or set IMAGEWORKS_OLLAMA_HOST to where it runs"
        else:
            fix = f"start Ollama there, or correct backend_config.host of {', '.join(names)}"
        found = str(exc).rstrip(".") + (f", and {users} it" if names else "")
        return warn("ollama", found, fix, url=root, entries=names)
    found = f"Ollama {version} at {root}" + (f" ({users} it)" if names else "")
    return ok("ollama", found, url=root, version=version)
