"""`list`, `show`, `verify`, `lock`, `unlock`: the registry's entries and their version locks."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from imageworks.config import RegistrySettings
from imageworks.model_loader.context import Context
from imageworks.model_loader.errors import PROG, LoaderError
from imageworks.registry.errors import AmbiguousName, EntryNotFound, RegistryError
from imageworks.registry.installed import HttpServedModels, Installed, installed_states
from imageworks.registry.naming import display_name, logical_slug
from imageworks.registry.paths import weights_path
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.store import RegistrySnapshot
from imageworks.registry.verify import (
    TerminalProgress,
    VerifyResult,
    VerifyStatus,
    lock_patch,
    unlock_patch,
    verified_patch,
    verify_entry,
)


def list_entries(ctx: Context) -> None:
    args, snapshot, settings = ctx.args, ctx.snapshot, ctx.settings
    entries = [
        entry
        for entry in snapshot.entries
        if args.backend is None or entry.backend == args.backend.lower()
    ]
    states = _installed(entries, snapshot, settings)
    if args.installed:
        entries = [entry for entry in entries if states[entry.name] is Installed.YES]
    rows = [_summary(entry, states[entry.name]) for entry in entries]
    ctx.emit(rows, lambda: _table(rows))


def _table(rows: list[dict[str, Any]]) -> str:
    columns = ("name", "display_name", "backend", "quantization", "installed", "locked")
    headers = ("NAME", "DISPLAY NAME", "BACKEND", "QUANT", "INSTALLED", "LOCKED")
    table = [headers] + [tuple(_cell(row[c]) for c in columns) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in table]
    return "".join(line.rstrip() + "\n" for line in lines) + ("" if rows else "(no entries)\n")


def show(ctx: Context) -> None:
    snapshot, settings = ctx.snapshot, ctx.settings
    entry = ctx.resolve(ctx.args.name)
    summary = _summary(entry, _installed([entry], snapshot, settings)[entry.name])
    details = {
        **summary,
        "logical_slug": logical_slug(summary["display_name"]),
        "capabilities": entry.declared_capabilities,
        "defined_in": [str(path) for path in snapshot.sources[entry.name]],
        "entry": snapshot.raw[entry.name],
    }
    ctx.emit(details, lambda: _details(details))


def _details(details: dict[str, Any]) -> str:
    lines = [
        f"{key + ':':<14}{_cell(details[key])}"
        for key in ("name", "display_name", "backend", "quantization", "installed", "locked")
    ]
    declared = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in details["capabilities"].items())
    lines.append(f"{'capabilities:':<14}{declared or '-'}")
    lines.append(f"{'defined in:':<14}{', '.join(details['defined_in'])}")
    lines.append(json.dumps(details["entry"], indent=2))
    return "\n".join(lines) + "\n"


def verify(ctx: Context) -> None:
    args, snapshot, out = ctx.args, ctx.snapshot, ctx.out
    if args.name:
        targets = [ctx.resolve(args.name)]
    else:
        targets = [entry for entry in snapshot.entries if entry.version_lock.locked]
    results: list[dict[str, Any]] = []
    for entry in targets:
        result = _hash(ctx, entry)
        if result.status is VerifyStatus.OK:
            _update(ctx, entry.name, verified_patch(datetime.now(UTC)))
        results.append(_verdict(result))
        if not args.json:  # as each entry is done: hashing big weights takes a while
            out.write(_verdict_line(results[-1]))
    if args.json:
        ctx.emit(results, "")
    elif not targets:
        out.write("no locked entries to verify\n")
    changed = [r["name"] for r in results if r["status"] == VerifyStatus.CHANGED.value]
    if changed:
        raise LoaderError(
            f"weights changed since they were locked: {', '.join(changed)}",
            f"restore them, or accept them with `{PROG} lock NAME`",
        )


def _verdict(result: VerifyResult) -> dict[str, Any]:
    return {
        "name": result.name,
        "status": result.status.value,
        "sha256": result.digest.aggregate_sha256,
        "expected": result.expected,
    }


def _verdict_line(verdict: dict[str, Any]) -> str:
    name, digest = verdict["name"], verdict["sha256"]
    if verdict["status"] == VerifyStatus.CHANGED.value:
        return f"CHANGED   {name}  expected {verdict['expected']}  got {digest}\n"
    if verdict["status"] == VerifyStatus.OK.value:
        return f"OK        {name}  {digest}\n"
    return f"UNLOCKED  {name}  {digest}  (no lock recorded)\n"


def lock(ctx: Context) -> None:
    entry = ctx.resolve(ctx.args.name)
    result = _hash(ctx, entry)
    locked = _update(ctx, entry.name, lock_patch(result.digest, datetime.now(UTC)))
    text = f"locked {entry.name}  {result.digest.aggregate_sha256}\n"
    ctx.emit(_lock_json(locked), text)


def unlock(ctx: Context) -> None:
    entry = ctx.resolve(ctx.args.name)
    unlocked = _update(ctx, entry.name, unlock_patch())
    ctx.emit(_lock_json(unlocked), f"unlocked {entry.name}\n")


def _lock_json(entry: RegistryEntry) -> dict[str, Any]:
    return {"name": entry.name, "version_lock": entry.version_lock.model_dump(mode="json")}


def _hash(ctx: Context, entry: RegistryEntry) -> VerifyResult:
    try:
        return verify_entry(entry, ctx.store.directory, TerminalProgress())
    except RegistryError as exc:
        if weights_path(entry, ctx.store.directory) is None:
            fix = "only entries with local weights (download_path) can be locked or verified"
        else:
            fix = f"check its download_path (`{PROG} show {entry.name}`)"
        raise LoaderError(str(exc), fix) from exc


def _update(ctx: Context, name: str, patch: dict[str, Any]) -> RegistryEntry:
    try:
        return ctx.store.update_entry(name, patch)
    except (EntryNotFound, AmbiguousName):
        raise
    except RegistryError as exc:
        if isinstance(exc.__cause__, TimeoutError):  # the registry's lock
            raise LoaderError(str(exc), "wait for the other writer to finish, then retry") from exc
        if isinstance(exc.__cause__, ValidationError):
            raise LoaderError(str(exc), "correct the entry in the registry, then retry") from exc
        raise LoaderError(str(exc)) from exc  # a curated field: the message says where to change it
    except OSError as exc:
        raise LoaderError(
            f"cannot write to the registry {ctx.store.directory}: {exc.strerror or exc}",
            "make the registry directory writable",
        ) from exc


def _installed(
    entries: Sequence[RegistryEntry], snapshot: RegistrySnapshot, settings: RegistrySettings
) -> dict[str, Installed]:
    # Remote entries' keys are read from the environment, as the proxy's are.
    source = HttpServedModels(settings.installed_check_timeout_s, environ=os.environ)
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
