"""How tests start processes: `popen` and `run` are subprocess's, for an argv list, with one
addition: the child gets SIGTERM when the test run dies, even by SIGKILL (a CI time limit),
when nothing in pytest can run any more.

That is Linux's parent-death signal (`prctl(PR_SET_PDEATHSIG)`), set in the child between fork
and exec by a small Python stub that then execs the command: the pid, the command line and the
environment are the command's own. (Not a `preexec_fn`, which is unsafe in a process with
threads, as the test run is.) The signal follows the *thread* that forked, not the process, so
only children started from the main thread, which lives as long as the run, get it; a child
started from another thread is left to the run's watchdog (support.process_hygiene), which stops
every process the run started once pytest is gone.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

# argv: the stub, the pid that must be its parent, the program's path, then the command's argv.
# The parent may die before prctl: then the stub dies as the signal would have killed it.
_STUB = """\
import ctypes, os, signal, sys
PR_SET_PDEATHSIG = 1
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
if os.getppid() != int(sys.argv[1]):
    os.kill(os.getpid(), signal.SIGTERM)
os.execv(sys.argv[2], sys.argv[3:])
"""

Command = Sequence["str | os.PathLike[str]"]


def popen(args: Command, **kwargs: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen(args, **kwargs); `child.args` is `args` as given."""
    child = subprocess.Popen(_dying_with_us(args, kwargs), **kwargs)
    child.args = args
    return child


def run(args: Command, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run(args, **kwargs) (which kills the child on any exception, a timeout or a
    KeyboardInterrupt); `result.args` is `args` as given."""
    result = subprocess.run(_dying_with_us(args, kwargs), **kwargs)
    result.args = args
    return result


def _dying_with_us(args: Command, options: Mapping[str, Any]) -> list[str]:
    if options.get("shell") or "executable" in options:
        raise TypeError("an argv list only: no shell, no executable")
    argv = [os.fspath(arg) for arg in args]
    if threading.current_thread() is not threading.main_thread():
        return argv
    # Found here, as Popen would find it (on the child's PATH, a path with a slash from the
    # child's cwd), so a missing program raises FileNotFoundError in the parent, not the stub.
    name = argv[0]
    if os.sep in name:
        name = os.path.join(options.get("cwd") or os.getcwd(), name)
    env = options.get("env")
    program = shutil.which(name, path=(os.environ if env is None else env).get("PATH", os.defpath))
    if program is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    # -I -S: the stub imports only the standard library, whatever PYTHONPATH says.
    return [sys.executable, "-I", "-S", "-c", _STUB, str(os.getpid()), program, *argv]
