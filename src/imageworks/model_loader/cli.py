"""`imageworks-loader`: look at and look after the model registry.

    imageworks-loader list [--json] [--backend B] [--installed]
    imageworks-loader show NAME [--json]
    imageworks-loader verify [NAME]
    imageworks-loader lock NAME
    imageworks-loader unlock NAME
    imageworks-loader activate-model NAME | --stop
    imageworks-loader current-model

Errors are one line on stderr and a non-zero exit: 1 for a failed command, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from imageworks.backends.state import StateFile, StateLockTimeout
from imageworks.chat_proxy.config import ProxySettings, SettingsError, load_settings
from imageworks.chat_proxy.launching import launch_settings
from imageworks.config import RegistrySettings
from imageworks.model_loader.activation import (
    ActivationError,
    activate,
    current,
    proxy_url,
    state_json,
    stop,
    via_proxy,
)
from imageworks.registry.errors import RegistryError
from imageworks.registry.installed import HttpServedModels, Installed, installed_states
from imageworks.registry.naming import NameIndex, display_name, logical_slug
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.store import RegistrySnapshot, RegistryStore
from imageworks.registry.verify import (
    TerminalProgress,
    VerifyStatus,
    lock_patch,
    unlock_patch,
    verified_patch,
    verify_entry,
)

PROG = "imageworks-loader"


class CommandFailed(Exception):
    """The command ran but its answer is "no" (e.g. a changed hash): exit 1, message printed."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Inspect and maintain the registry.")
    parser.add_argument(
        "--registry-dir",
        type=Path,
        help="registry directory (default: $IMAGEWORKS_REGISTRY_DIR or ./configs)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", help="list registry entries")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.add_argument("--backend", help="only entries of this backend (vllm, ollama, ...)")
    listing.add_argument("--installed", action="store_true", help="only installed entries")

    show = commands.add_parser("show", help="show one entry as the registry resolves it")
    show.add_argument("name", help="logical name, display name, alias or served id")
    show.add_argument("--json", action="store_true", help="print JSON only")

    verify = commands.add_parser("verify", help="hash weights and compare with version locks")
    verify.add_argument("name", nargs="?", help="one entry (default: every locked entry)")

    lock = commands.add_parser("lock", help="record the weights' hash and lock the entry")
    lock.add_argument("name")
    unlock = commands.add_parser("unlock", help="stop enforcing the entry's version lock")
    unlock.add_argument("name")

    activate = commands.add_parser(
        "activate-model", help="start a vLLM/llama.cpp model on the managed port (or --stop)"
    )
    activate.add_argument("name", nargs="?", help="the model to start")
    activate.add_argument("--stop", action="store_true", help="stop the running model")
    commands.add_parser("current-model", help="show the model holding the managed port")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = RegistrySettings()
        store = RegistryStore(args.registry_dir or settings.registry_dir)
        snapshot = store.load()
        for warning in snapshot.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        _refresh_merged_file(store)
        _COMMANDS[args.command](Context(args, store, snapshot, settings, sys.stdout))
    except CommandFailed as failure:
        print(f"{PROG}: {failure}", file=sys.stderr)
        return 1
    except (ActivationError, StateLockTimeout) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except (RegistryError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:  # only settings are validated here
        problem = exc.errors()[0]
        variable = "IMAGEWORKS_" + "_".join(str(p) for p in problem["loc"]).upper()
        print(f"{PROG}: error: {variable}: {problem['msg']}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _refresh_merged_file(store: RegistryStore) -> None:
    """Keep model_registry.json in step with the layers; a read-only registry still lists."""
    try:
        store.refresh_merged_file()
    except (RegistryError, OSError) as exc:
        print(f"{PROG}: warning: could not update {store.merged_path}: {exc}", file=sys.stderr)


# -- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What every command gets: its arguments, the registry, and where to print."""

    args: argparse.Namespace
    store: RegistryStore
    snapshot: RegistrySnapshot
    settings: RegistrySettings
    out: TextIO


def _list(ctx: Context) -> None:
    args, snapshot, settings, out = ctx.args, ctx.snapshot, ctx.settings, ctx.out
    entries = [
        entry
        for entry in snapshot.entries
        if args.backend is None or entry.backend == args.backend.lower()
    ]
    states = _installed(entries, snapshot, settings)
    if args.installed:
        entries = [entry for entry in entries if states[entry.name] is Installed.YES]
    rows = [_summary(entry, states[entry.name]) for entry in entries]
    if args.json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return
    columns = ("name", "display_name", "backend", "quantization", "installed", "locked")
    headers = ("NAME", "DISPLAY NAME", "BACKEND", "QUANT", "INSTALLED", "LOCKED")
    table = [headers] + [tuple(_cell(row[c]) for c in columns) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    for line in table:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        out.write("\n")
    if not rows:
        out.write("(no entries)\n")


def _show(ctx: Context) -> None:
    args, snapshot, settings, out = ctx.args, ctx.snapshot, ctx.settings, ctx.out
    entry = NameIndex(snapshot.entries).resolve(args.name)
    summary = _summary(entry, _installed([entry], snapshot, settings)[entry.name])
    details = {
        **summary,
        "logical_slug": logical_slug(summary["display_name"]),
        "capabilities": entry.declared_capabilities,
        "defined_in": [str(path) for path in snapshot.sources[entry.name]],
        "entry": snapshot.raw[entry.name],
    }
    if args.json:
        json.dump(details, out, indent=2)
        out.write("\n")
        return
    for key in ("name", "display_name", "backend", "quantization", "installed", "locked"):
        out.write(f"{key + ':':<14}{_cell(details[key])}\n")
    declared = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in details["capabilities"].items())
    out.write(f"{'capabilities:':<14}{declared or '-'}\n")
    out.write(f"{'defined in:':<14}{', '.join(details['defined_in'])}\n")
    out.write(json.dumps(details["entry"], indent=2) + "\n")


def _verify(ctx: Context) -> None:
    args, store, snapshot, out = ctx.args, ctx.store, ctx.snapshot, ctx.out
    if args.name:
        targets = [NameIndex(snapshot.entries).resolve(args.name)]
    else:
        targets = [entry for entry in snapshot.entries if entry.version_lock.locked]
        if not targets:
            out.write("no locked entries to verify\n")
            return
    changed: list[str] = []
    for entry in targets:
        result = verify_entry(entry, store.directory, TerminalProgress())
        digest = result.digest.aggregate_sha256
        if result.status is VerifyStatus.CHANGED:
            changed.append(entry.name)
            out.write(f"CHANGED   {entry.name}  expected {result.expected}  got {digest}\n")
        elif result.status is VerifyStatus.OK:
            store.update_entry(entry.name, verified_patch(datetime.now(UTC)))
            out.write(f"OK        {entry.name}  {digest}\n")
        else:
            out.write(f"UNLOCKED  {entry.name}  {digest}  (no lock recorded)\n")
    if changed:
        raise CommandFailed(f"weights changed since they were locked: {', '.join(changed)}")


def _lock(ctx: Context) -> None:
    args, store, snapshot, out = ctx.args, ctx.store, ctx.snapshot, ctx.out
    entry = NameIndex(snapshot.entries).resolve(args.name)
    result = verify_entry(entry, store.directory, TerminalProgress())
    store.update_entry(entry.name, lock_patch(result.digest, datetime.now(UTC)))
    out.write(f"locked {entry.name}  {result.digest.aggregate_sha256}\n")


def _unlock(ctx: Context) -> None:
    args, store, snapshot, out = ctx.args, ctx.store, ctx.snapshot, ctx.out
    entry = NameIndex(snapshot.entries).resolve(args.name)
    store.update_entry(entry.name, unlock_patch())
    out.write(f"unlocked {entry.name}\n")


def _activate_model(ctx: Context) -> None:
    args, store, snapshot, settings, out = (
        ctx.args,
        ctx.store,
        ctx.snapshot,
        ctx.settings,
        ctx.out,
    )
    proxy = _proxy_settings()
    url = proxy_url(proxy)
    if args.stop or (args.name or "").lower() in ("none", "stop"):
        if url is not None:
            status = via_proxy(url, "POST", "/v1/admin/stop")
            out.write(f"stopped the model served by the proxy at {url}\n")
            out.write(json.dumps(status, indent=2) + "\n")
            return
        stopped = stop(StateFile(proxy.vllm_state_path), proxy.vllm_stop_timeout_s)
        out.write(
            f"stopped {stopped.entry} (pid {stopped.pid})\n"
            if stopped
            else "no model was running\n"
        )
        return
    if not args.name:
        raise CommandFailed("activate-model needs a model name, or --stop")
    entry = NameIndex(snapshot.entries).resolve(args.name)
    if url is not None:
        status = via_proxy(url, "POST", "/v1/admin/activate", {"model": entry.name})
        out.write(json.dumps(status, indent=2) + "\n")
        return
    if entry.backend not in ("vllm", "llamacpp") or (
        entry.backend == "vllm" and not proxy.vllm_single_port
    ):
        raise CommandFailed(
            f"{entry.name} is served by {entry.backend!r}, which the proxy does not start "
            "(only vllm and llamacpp entries, with CHAT_PROXY_VLLM_SINGLE_PORT=1)"
        )
    launches = launch_settings(proxy, store.directory)
    state = activate(entry, proxy, launches, settings.ollama_host)
    out.write(json.dumps(state_json(state), indent=2) + "\n")


def _current_model(ctx: Context) -> None:
    out = ctx.out
    proxy = _proxy_settings()
    url = proxy_url(proxy)
    if url is not None:
        status = via_proxy(url, "GET", "/v1/admin/status")
        out.write(json.dumps({"proxy": url, **status}, indent=2) + "\n")
        return
    state = current(StateFile(proxy.vllm_state_path))
    out.write(json.dumps(state_json(state), indent=2) + "\n")


def _proxy_settings() -> ProxySettings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise CommandFailed(f"configuration error: {exc}") from exc


_COMMANDS = {
    "list": _list,
    "show": _show,
    "verify": _verify,
    "lock": _lock,
    "unlock": _unlock,
    "activate-model": _activate_model,
    "current-model": _current_model,
}


# -- helpers -----------------------------------------------------------------------------------


def _installed(
    entries: Sequence[RegistryEntry], snapshot: RegistrySnapshot, settings: RegistrySettings
) -> dict[str, Installed]:
    source = HttpServedModels(settings.installed_check_timeout_s)
    return installed_states(entries, snapshot.directory, source, settings.ollama_host)


def _summary(entry: RegistryEntry, installed: Installed) -> dict[str, Any]:
    return {
        "name": entry.name,
        "display_name": display_name(entry),
        "backend": entry.backend,
        "quantization": entry.quantization,
        "installed": installed.value,
        "locked": entry.version_lock.locked,
    }


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
