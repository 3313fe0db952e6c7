"""llama.cpp servers: `python -m llama_cpp.server` (llama-cpp-python) or a native `llama-server`.

Both speak the OpenAI protocol. llama-cpp-python has no `/health`, so readiness is polled on
`/v1/models` (the supervisor tries `/health` first, which native `llama-server` has)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from imageworks.backends.argv import merge_args
from imageworks.backends.base import BackendNotReady
from imageworks.backends.supervisor import LaunchSpec
from imageworks.registry.paths import weights_path
from imageworks.registry.schema import RegistryEntry


def model_file(entry: RegistryEntry, registry_dir: Path) -> Path:
    path = weights_path(entry, registry_dir)
    if path is None:
        raise BackendNotReady(f"{entry.name}: the entry names no model file (download_path)")
    if not path.is_file():
        raise BackendNotReady(f"{entry.name}: model file {path} not found")
    return path


def llamacpp_argv(
    entry: RegistryEntry,
    model: Path,
    *,
    host: str,
    port: int,
    python: str = sys.executable,
    server_binary: str | None = None,
) -> list[str]:
    extra = entry.backend_config.extra_args
    if server_binary:  # native llama.cpp `llama-server`
        defaults = [
            ("--model", str(model)),
            ("--host", host),
            ("--port", str(port)),
            ("--alias", entry.upstream_model_id),
        ]
        return [server_binary, *merge_args(defaults, extra)]
    defaults = [
        ("--model", str(model)),
        ("--host", host),
        ("--port", str(port)),
        ("--model_alias", entry.upstream_model_id),
    ]
    return [python, "-m", "llama_cpp.server", *merge_args(defaults, extra)]


def log_file_name(entry: RegistryEntry) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", entry.name).strip("_") + ".log"


def llamacpp_launch(
    entry: RegistryEntry,
    *,
    registry_dir: Path,
    port: int,
    log_dir: Path,
    server_binary: str | None = None,
) -> LaunchSpec:
    host = "127.0.0.1"
    argv = llamacpp_argv(
        entry, model_file(entry, registry_dir), host=host, port=port, server_binary=server_binary
    )
    return LaunchSpec(
        name=entry.name,
        argv=tuple(argv),
        port=port,
        host=host,
        log_path=log_dir / "llamacpp" / log_file_name(entry),
    )
