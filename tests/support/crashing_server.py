"""A model server that dies while loading, as llama.cpp builds do on CPUs whose kernels crash
them (ggml's AMX repacking on some Intel Xeons): killed by a signal right after start-up,
unless it is given its safe-mode flag.

`write_crashing_launcher(directory, then=...)` makes an executable to set as
CHAT_PROXY_LLAMA_SERVER_BINARY (or to put in a LaunchSpec). Without `--no-repack` it prints a
line of llama-server's start-up and kills itself with `crash`; with it, it becomes `then` (the
real llama-server, so the real model answers) or, by default, the scripted llama-server stand-in.
`exit_code` makes it exit with that status instead of a signal (a configuration error).
`--version` loads no model: it never crashes then."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
SAFE_FLAG = "--no-repack"


def write_crashing_launcher(
    directory: Path,
    *,
    crash: str = "SIGSEGV",
    always: bool = False,
    exit_code: int | None = None,
    then: Path | None = None,
    name: str = "llama-server",
) -> Path:
    """The launcher; `always`: it crashes in safe mode too."""
    if then is not None:
        serve = f"os.execv({str(then)!r}, [{str(then)!r}, *args])\n"
    else:
        serve = (
            f"sys.path.insert(0, {str(TESTS)!r})\n"
            "from support.scripted_llama_server import main\n"
            "main(args)\n"
        )
    if exit_code is not None:
        die = f"print('error: invalid argument', flush=True)\nsys.exit({exit_code})\n"
    else:
        die = (
            f"signal.signal(signal.{crash}, signal.SIG_DFL)\nos.kill(os.getpid(), signal.{crash})\n"
        )
    # `--version` loads no model, so it answers as the real one does.
    loading = "'--version' not in args"
    condition = loading if always else f"{loading} and {SAFE_FLAG!r} not in args"
    path = directory / name
    path.write_text(
        f"#!{sys.executable}\n"
        "import os, signal, sys\n"
        "args = sys.argv[1:]\n"
        f"if {condition}:\n"
        "    print('llama threadpool init, n_threads = 2', flush=True)\n"
        + "".join(f"    {line}\n" for line in die.splitlines())
        + serve
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def zombie_children(pid: int) -> list[int]:
    """Children of `pid` that exited and were never reaped."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found
