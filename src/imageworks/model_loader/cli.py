"""`imageworks-loader`: look at and look after the model registry, and the model on the GPU.

    imageworks-loader --version
    imageworks-loader list [--backend B] [--installed] [--json]
    imageworks-loader show NAME [--json]
    imageworks-loader verify [NAME] [--json]
    imageworks-loader lock NAME [--json]
    imageworks-loader unlock NAME [--json]
    imageworks-loader activate-model NAME | --stop [--json]
    imageworks-loader current-model [--json]
    imageworks-loader discover [--weights-dir DIR] [--ollama-host URL | --no-ollama]
                               [--dry-run] [--json]
    imageworks-loader doctor [--model NAME] [--json]

Output is text for people. With `--json` stdout holds exactly one JSON document instead, and
nothing else. `current-model --json` prints the state file's record, or `null` when no model is
active; while a proxy runs, its `/v1/admin/status` answer with `"proxy": URL` added.
`activate-model --json` prints the same shapes after the change (`--stop`: the record stopped,
or `null`). `discover --json` prints what it added, updated, marked missing and left to curated
entries, with its warnings (see model_loader/discover_command.py). `doctor` prints one line
per check (`ok`, `warn` or `FAIL`, what was found, and the fix), or with `--json` one document
`{ok, seconds, checks: [{name, status, found, fix, ...}]}`, and exits 1 when a check failed
(model_loader/doctor.py); a broken registry is one of its findings, not an error.

A failure is one line on stderr, `imageworks-loader: error: <problem>; <what to do>`, and exit
status 1 (2 for bad usage). Nothing is printed on stdout then, with `--json` too: scripts test the
exit status. Two exceptions: `verify` prints its results before failing on changed weights, and
a model server that failed to start has its last log lines printed (indented) after the error
line, unless `--json` is given. Warnings (a malformed registry entry) go to stderr and do not fail.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from imageworks.backends.state import StateLockTimeout
from imageworks.config import RegistrySettings
from imageworks.model_loader import discover_command, doctor, model_commands, registry_commands
from imageworks.model_loader.activation import STATE_FIX
from imageworks.model_loader.context import Context
from imageworks.model_loader.errors import PROG, ActivationError, LoaderError
from imageworks.registry.errors import AmbiguousName, EntryNotFound, RegistryError
from imageworks.registry.store import RegistrySnapshot, RegistryStore

_TAIL_LINES = 15


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line too, naming the help to read (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}; see `{self.prog} --help`\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Inspect and maintain the registry and the GPU.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('imageworks')}")
    parser.add_argument(
        "--registry-dir",
        type=Path,
        help="registry directory (default: $IMAGEWORKS_REGISTRY_DIR or ./configs)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, json_help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.add_argument("--json", action="store_true", help=json_help)
        return sub

    listing = command("list", "list registry entries", "print a JSON list instead of a table")
    listing.add_argument("--backend", help="only entries of this backend (vllm, ollama, ...)")
    listing.add_argument("--installed", action="store_true", help="only installed entries")

    show = command("show", "show one entry as the registry resolves it", "print JSON only")
    show.add_argument("name", help="logical name, display name, alias or served id")

    verify = command(
        "verify",
        "hash weights and compare with version locks",
        "print a JSON list of {name, status (ok/changed/unlocked), sha256, expected}",
    )
    verify.add_argument("name", nargs="?", help="one entry (default: every locked entry)")
    lock = command(
        "lock", "record the weights' hash and lock the entry", "print {name, version_lock}"
    )
    lock.add_argument("name")
    unlock = command(
        "unlock", "stop enforcing the entry's version lock", "print {name, version_lock}"
    )
    unlock.add_argument("name")

    activate = command(
        "activate-model",
        "start a vLLM/llama.cpp model on the managed port (or --stop it)",
        "print the new record (--stop: the record stopped, or null); through a running proxy, "
        'its status with "proxy": URL',
    )
    which = activate.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="the model to start")
    which.add_argument("--stop", action="store_true", help="stop the running model")
    command(
        "current-model",
        "show the model holding the managed port",
        "print the state file's record, or null when no model is active; through a running "
        'proxy, its /v1/admin/status with "proxy": URL',
    )
    discover = command(
        "discover",
        "record the models on this machine (a weights directory, Ollama) in the discovered layer",
        "print one JSON document: what was added, updated, marked missing, and warnings",
    )
    discover.add_argument(
        "--weights-dir",
        type=Path,
        metavar="DIR",
        help="directory to scan for GGUF files and Hugging Face folders "
        "(default: $IMAGEWORKS_WEIGHTS_DIR; neither: not scanned)",
    )
    ollama = discover.add_mutually_exclusive_group()
    ollama.add_argument(
        "--ollama-host", metavar="URL", help="Ollama to ask (default: $IMAGEWORKS_OLLAMA_HOST)"
    )
    ollama.add_argument("--no-ollama", action="store_true", help="do not ask Ollama")
    discover.add_argument(
        "--dry-run", action="store_true", help="print what would change; write nothing"
    )
    doctor_cmd = command(
        "doctor",
        "check what a new user needs: registry, backends, ports, GPU, Ollama, one model's answer",
        'print {"ok", "seconds", "checks": [{name, status, found, fix, ...}]}',
    )
    doctor_cmd.add_argument(
        "--model",
        metavar="NAME",
        help="the model to load and ask for one token "
        "(default: the smallest installed llama.cpp chat entry)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _registry_settings()
        store = RegistryStore(args.registry_dir or settings.registry_dir)
        if args.command == "doctor":  # a broken registry is one of its findings
            return doctor.doctor(args, store, settings, sys.stdout)
        snapshot = _load(store, fresh_ok=args.command == "discover")
        for warning in snapshot.warnings:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
        if not getattr(args, "dry_run", False):  # a dry run leaves every file as it was
            _refresh_merged_file(store)
        _COMMANDS[args.command](Context(args, store, snapshot, settings, sys.stdout))
    except (LoaderError, RegistryError, OSError) as exc:  # StateLockTimeout is an OSError
        failure = _explain(exc)
        print(f"{PROG}: error: {' '.join(str(failure).splitlines())}", file=sys.stderr)
        if isinstance(failure, ActivationError) and failure.log_tail and not args.json:
            lines = [line for line in failure.log_tail.splitlines() if line.strip()]
            for line in lines[-_TAIL_LINES:]:
                print(f"    {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _explain(exc: Exception) -> LoaderError:
    """The one translation of other modules' errors into what the user reads."""
    if isinstance(exc, LoaderError):
        return exc
    if isinstance(exc, EntryNotFound):
        close = ", ".join(repr(s) for s in exc.suggestions)
        hint = f" (did you mean {close}?)" if close else ""
        return LoaderError(
            f"no model named {exc.name!r} in the registry{hint}",
            f"run `{PROG} list` to see the names",
        )
    if isinstance(exc, AmbiguousName):
        return LoaderError(str(exc))  # it ends with what to do: use one of the exact names
    if isinstance(exc, StateLockTimeout):
        return LoaderError(str(exc), f"wait for it to finish, then retry; or {STATE_FIX}")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return LoaderError(f"{where}{exc.strerror or exc}", "check that path and its permissions")
    return LoaderError(str(exc), "check the registry files (--registry-dir)")


def _registry_settings() -> RegistrySettings:
    try:
        return RegistrySettings()
    except ValidationError as exc:
        problem = exc.errors()[0]
        variable = "IMAGEWORKS_" + "_".join(str(p) for p in problem["loc"]).upper()
        raise LoaderError(
            f"{variable}: {problem['msg']}", f"correct {variable} or unset it"
        ) from exc


def _load(store: RegistryStore, *, fresh_ok: bool = False) -> RegistrySnapshot:
    """The registry; with `fresh_ok`, a directory without registry files is an empty one
    (discover starts a registry there)."""
    files = (store.curated_path, store.discovered_path, store.merged_path)
    if fresh_ok and store.directory.is_dir() and not any(path.exists() for path in files):
        return RegistrySnapshot(store.directory, layered=True, entries=(), raw={}, sources={})
    try:
        return store.load()
    except RegistryError as exc:
        if any(path.exists() for path in files):
            raise LoaderError(str(exc), "correct that file, then retry") from exc
        where = "point --registry-dir or IMAGEWORKS_REGISTRY_DIR at the registry directory"
        raise LoaderError(str(exc), where) from exc


def _refresh_merged_file(store: RegistryStore) -> None:
    """Keep model_registry.json in step with the layers; a read-only registry still lists."""
    try:
        store.refresh_merged_file()
    except (RegistryError, OSError) as exc:
        print(f"{PROG}: warning: could not update {store.merged_path}: {exc}", file=sys.stderr)


_COMMANDS: dict[str, Callable[[Context], None]] = {
    "list": registry_commands.list_entries,
    "show": registry_commands.show,
    "verify": registry_commands.verify,
    "lock": registry_commands.lock,
    "unlock": registry_commands.unlock,
    "activate-model": model_commands.activate_model,
    "current-model": model_commands.current_model,
    "discover": discover_command.discover,
}


if __name__ == "__main__":
    sys.exit(main())
