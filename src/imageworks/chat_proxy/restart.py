"""`POST /v1/admin/restart`: drain, stop, and start afresh in the same process slot.

The restart is uvicorn's graceful shutdown (requests in flight finish, the managed model is
stopped unless CHAT_PROXY_LEAVE_MODEL_RUNNING=1), then either `exec` of the same command line
or, with CHAT_PROXY_RESTART_MODE=exit, a clean exit for Docker's restart policy or systemd.

With `exec` the listening socket is handed to the new program instead of being closed: a
duplicate of it stays open through the drain and the exec, so clients that connect meanwhile
wait in the kernel's accept queue and are answered by the new proxy, never refused. The new
program finds it through `_IMAGEWORKS_LISTEN_FD` (set here, read once, removed at once).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Literal

log = logging.getLogger("imageworks.chat_proxy")

LISTEN_FD_ENV = "_IMAGEWORKS_LISTEN_FD"

RestartMode = Literal["exec", "exit"]


class RestartUnavailable(Exception):
    """The app is not run by `imageworks-chat-proxy` (a test's ASGI client, say)."""


class RestartControl:
    """How the restart endpoint reaches the server running the app; one per app."""

    def __init__(self, mode: RestartMode) -> None:
        self.mode: RestartMode = mode
        self.requested = False
        self._begin: Callable[[], None] | None = None

    def attach(self, begin_shutdown: Callable[[], None]) -> None:
        """Called by `main()` with what starts the server's graceful shutdown."""
        self._begin = begin_shutdown

    def request(self) -> None:
        """Start the restart (again: nothing more happens). The caller's own answer is a
        request in flight, so the graceful shutdown sends it before the server stops."""
        if self._begin is None:
            raise RestartUnavailable("only a proxy started by imageworks-chat-proxy can restart")
        if not self.requested:
            self.requested = True
            log.info("restart requested (%s): draining requests in flight", self.mode)
            self._begin()


def listening_socket(host: str, port: int) -> socket.socket:
    """The socket to serve on: the one a restarting predecessor handed over, else a new one
    bound as uvicorn would bind it."""
    inherited = os.environ.pop(LISTEN_FD_ENV, None)
    if inherited is not None and inherited.isdigit():
        sock = socket.socket(fileno=int(inherited))
        sock.set_inheritable(False)
        return sock
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class SocketHandover:
    """A duplicate of the listening socket that outlives uvicorn closing its own copy: handed
    to the next program on a restart, closed on any other shutdown (so a stopping proxy refuses
    new connections instead of letting them queue for nobody)."""

    def __init__(self, sock: socket.socket) -> None:
        self._fd: int | None = os.dup(sock.fileno())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def exec_again(self) -> None:
        """Replace this program by a fresh run of the same command line (never returns)."""
        assert self._fd is not None, "the socket was released"
        os.set_inheritable(self._fd, True)
        os.environ[LISTEN_FD_ENV] = str(self._fd)
        argv = [sys.executable, *sys.orig_argv[1:]]
        log.info("restarting: exec %s", " ".join(argv))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, argv)
