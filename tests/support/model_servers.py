"""Wrappers around the real `llama-server` that misbehave in one chosen way, for fault tests."""

from __future__ import annotations

import stat

from support.proxy_process import Workspace

# A model server that takes `delay` seconds before it even starts loading (exec keeps its pid).
SLOW_START = '#!/bin/sh\nsleep {delay}\nexec {server} "$@"\n'
# A model server whose group leader ignores SIGTERM: only SIGKILL ends it.
IGNORES_SIGTERM = """#!{python}
import signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
server = subprocess.Popen([{server!r}, *sys.argv[1:]], preexec_fn=lambda: signal.signal(
    signal.SIGTERM, signal.SIG_DFL))
server.wait()
signal.pause()
"""


def serve_through(ws: Workspace, script: str, **env: str) -> None:
    """Start the demo's llama-server through `script` (a wrapper around the real binary)."""
    path = ws.root / "model-server"
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    ws.extra_env.update(CHAT_PROXY_LLAMA_SERVER_BINARY=str(path), **env)
