"""The scripted upstream in the place of llama.cpp's `llama-server`, for the proxy to manage.

`write_launcher(directory)` makes an executable to set as CHAT_PROXY_LLAMA_SERVER_BINARY. The
proxy starts it as it would start llama-server; it serves the scripted scenarios (the served id,
`--alias`, picks one) and the tokenizer endpoints on the `--port` it is given, until SIGTERM."""

from __future__ import annotations

import argparse
import signal
import stat
import sys
from pathlib import Path

from support.scripted_upstream import ScriptedUpstream

TESTS = Path(__file__).resolve().parent.parent


def write_launcher(directory: Path) -> Path:
    path = directory / "llama-server"
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from support.scripted_llama_server import main\n"
        "main(sys.argv[1:])\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_known_args(argv)[0].port  # llama-server's other flags mean nothing here
    stop = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # the server's thread inherits the mask
    with ScriptedUpstream(port=port):
        signal.sigwait(stop)
