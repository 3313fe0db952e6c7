"""`discover`: record the models really on this machine in the registry's discovered layer.

    imageworks-loader discover [--weights-dir DIR] [--ollama-host URL | --no-ollama]
                               [--dry-run] [--json]

Two sources, each optional:
- the weights directory (`--weights-dir`, else IMAGEWORKS_WEIGHTS_DIR; neither: not scanned, and
  the output says so): Hugging Face folders become `vllm` entries, GGUF files `llamacpp` ones
  (see registry/weights_scan.py); a directory that does not exist is an error, since marking
  every model under it missing would be wrong when a disk is merely not mounted;
- Ollama (`--ollama-host`, else IMAGEWORKS_OLLAMA_HOST; `--no-ollama` skips it): its installed
  tags become `ollama` entries without a host, so IMAGEWORKS_OLLAMA_HOST keeps deciding where
  the proxy reaches them. An Ollama that does not answer is a warning, and its entries are
  left as they are.

The rules for what is written (curated wins, missing files are marked, not deleted, a second
run writes nothing) are in registry/discovery.py. `--dry-run` computes the same changes and
prints them without writing. The output lists what was added, updated (with the fields),
marked missing, found again, left to a curated entry, and how many entries were unchanged;
warnings (no chat template, Ollama unreachable, unreadable files) go to stderr, and with
`--json` they are in the one JSON document on stdout as well. A running proxy notices the
written layer by itself within about a second.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imageworks.model_loader.context import Context
from imageworks.model_loader.errors import PROG, LoaderError
from imageworks.registry.discovered_entries import Found, from_ollama
from imageworks.registry.discovery import Change, Plan, Scanned, plan
from imageworks.registry.errors import RegistryError
from imageworks.registry.layers import RawEntry
from imageworks.registry.ollama_tags import OllamaUnreachable, list_models
from imageworks.registry.weights_scan import scan_weights

OLLAMA_TIMEOUT_S = 5.0  # per request; a model's /api/show can take a moment on a busy server


@dataclass
class _Sources:
    found: list[Found] = field(default_factory=list)
    weights_root: Path | None = None
    weights_models: int = 0
    ollama_host: str | None = None
    ollama_scanned: bool = False
    ollama_models: int = 0
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def discover(ctx: Context) -> None:
    args = ctx.args
    sources = _scan(ctx)
    scanned = Scanned(sources.weights_root, sources.ollama_scanned)
    today = datetime.now(UTC).date().isoformat()
    result: list[Plan] = []

    def rewrite(curated: Mapping[str, RawEntry], items: list[Any]) -> list[Any]:
        result.append(
            plan(
                sources.found,
                scanned,
                curated,
                items,
                registry_dir=ctx.store.directory,
                today=today,
            )
        )
        return result[-1].items

    try:
        changed = ctx.store.rewrite_discovered(rewrite, dry_run=args.dry_run)
    except RegistryError as exc:
        if isinstance(exc.__cause__, TimeoutError):  # the registry's lock
            raise LoaderError(str(exc), "wait for the other writer to finish, then retry") from exc
        raise LoaderError(str(exc), "correct that entry in the registry, then retry") from exc
    except OSError as exc:
        raise LoaderError(
            f"cannot write to the registry {ctx.store.directory}: {exc.strerror or exc}",
            "make the registry directory writable",
        ) from exc
    done = result[-1]
    warnings = [*sources.warnings, *done.warnings]
    for warning in warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    written = changed and not args.dry_run
    document = _document(ctx, sources, done, warnings, changed=changed, written=written)
    ctx.emit(document, lambda: _text(ctx, sources, done, changed=changed))


def _scan(ctx: Context) -> _Sources:
    args, settings = ctx.args, ctx.settings
    sources = _Sources()
    root = args.weights_dir or settings.weights_dir
    if root is None:
        sources.notes.append(
            "no weights directory: pass --weights-dir or set IMAGEWORKS_WEIGHTS_DIR to scan one"
        )
    else:
        root = root.expanduser().absolute()
        if not root.is_dir():
            raise LoaderError(
                f"weights directory {root} does not exist or is not a directory",
                "check --weights-dir or IMAGEWORKS_WEIGHTS_DIR (is its disk mounted?)",
            )
        scan = scan_weights(root)
        sources.found += scan.found
        sources.warnings += scan.warnings
        sources.weights_root = root
        sources.weights_models = len(scan.found)
    if args.no_ollama:
        sources.notes.append("Ollama not asked (--no-ollama)")
        return sources
    host = args.ollama_host or settings.ollama_host
    sources.ollama_host = host
    try:
        models = list_models(host, OLLAMA_TIMEOUT_S)
    except OllamaUnreachable as exc:
        sources.warnings.append(
            f"Ollama unreachable ({exc}): its entries were left as they are; "
            "start it or pass --ollama-host (or --no-ollama)"
        )
        return sources
    sources.ollama_scanned = True
    sources.ollama_models = len(models)
    sources.found += [from_ollama(model) for model in models]
    return sources


def _document(
    ctx: Context,
    sources: _Sources,
    done: Plan,
    warnings: list[str],
    *,
    changed: bool,
    written: bool,
) -> dict[str, Any]:
    def changes(items: list[Change]) -> list[dict[str, Any]]:
        return [item.as_json() for item in items]

    return {
        "registry": str(ctx.store.directory),
        "dry_run": bool(ctx.args.dry_run),
        "changed": changed,
        "written": written,
        "sources": {
            "weights": {
                "dir": str(sources.weights_root) if sources.weights_root else None,
                "scanned": sources.weights_root is not None,
                "models": sources.weights_models,
            },
            "ollama": {
                "host": sources.ollama_host,
                "scanned": sources.ollama_scanned,
                "models": sources.ollama_models,
            },
        },
        "added": changes(done.added),
        "updated": changes(done.updated),
        "missing": changes(done.missing),
        "restored": changes(done.restored),
        "removed": changes(done.removed),
        "curated": [{"found": key, "as": name} for key, name in done.curated],
        "unchanged": done.unchanged,
        "still_missing": done.still_missing,
        "notes": sources.notes,
        "warnings": warnings,
    }


def _text(ctx: Context, sources: _Sources, done: Plan, *, changed: bool) -> str:
    lines = [_summary(sources)]
    lines += [f"note: {note}" for note in sources.notes]
    rows: list[tuple[str, str, str, str]] = []
    for word, items in (("added", done.added), ("restored", done.restored)):
        rows += [(word, c.display_name, c.backend, c.key) for c in items]
    rows += [("updated", c.display_name, c.backend, ", ".join(c.fields)) for c in done.updated]
    rows += [
        ("missing", c.display_name, c.backend, f"{c.key} is gone (marked, not deleted)")
        for c in done.missing
    ]
    rows += [
        ("removed", c.display_name, c.backend, f"{c.key} is curated under another name")
        for c in done.removed
    ]
    rows += [("curated", key, "", f"curated as {name}") for key, name in done.curated]
    if rows:
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines += [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
            + f"  {row[3]}"
            for row in rows
        ]
    tail = f"unchanged: {len(done.unchanged)}"
    if done.still_missing:
        tail += f"; still missing: {len(done.still_missing)}"
    lines.append(tail)
    target = ctx.store.discovered_path if ctx.store.is_layered() else ctx.store.merged_path
    if not changed:
        lines.append("Nothing changed; nothing written.")
    elif ctx.args.dry_run:
        lines.append(f"Dry run: {target} would change; nothing written.")
    else:
        lines.append(f"Wrote {target}.")
    return "".join(line.rstrip() + "\n" for line in lines)


def _summary(sources: _Sources) -> str:
    parts = []
    if sources.weights_root is not None:
        parts.append(f"{sources.weights_root} ({_models(sources.weights_models)})")
    if sources.ollama_scanned:
        parts.append(f"Ollama at {sources.ollama_host} ({_models(sources.ollama_models)})")
    return f"Scanned {' and '.join(parts)}." if parts else "Scanned nothing."


def _models(count: int) -> str:
    return f"{count} model{'' if count == 1 else 's'}"
