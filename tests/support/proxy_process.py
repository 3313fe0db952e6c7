"""The real `imageworks-chat-proxy` console script as a child process, and process checks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from support import child_processes

SCRIPTS = Path(sys.executable).parent
PROXY = SCRIPTS / "imageworks-chat-proxy"
LOADER = SCRIPTS / "imageworks-loader"
# The code under test: the console scripts run in a workspace directory, where a relative
# PYTHONPATH (`src`) finds nothing and the installed package would be imported instead.
SOURCE = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped while we looked
        return False


def processes_listening_on(port: int) -> list[int]:
    """Pids of model servers started with `--port <port>` (the process table, not our memory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in argv and str(port).encode() in argv and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


@dataclass
class Workspace:
    """A directory with configs/ (the registry) to run the proxy and loader in. `close` stops
    what it started: every proxy still running, and the model servers on its port."""

    root: Path
    proxy_port: int = field(default_factory=free_port)
    model_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    # Directories first on the PYTHONPATH of the proxy and what it starts: their modules stand in
    # for installed ones (support/llama_cpp_python.py).
    stand_ins: tuple[Path, ...] = ()
    _proxies: list[RunningProxy] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        # Two free_port() calls may return the same port (each socket is closed before the
        # next is bound): the model server would then find the proxy on its port.
        while self.model_port == self.proxy_port:
            self.model_port = free_port()

    def env(self) -> dict[str, str]:
        inherited = os.environ.get("PYTHONPATH")
        path = [*map(str, self.stand_ins), str(SOURCE), *([inherited] if inherited else [])]
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            "CHAT_PROXY_PORT": str(self.proxy_port),
            "CHAT_PROXY_VLLM_PORT": str(self.model_port),
            "IMAGEWORKS_OLLAMA_HOST": "http://127.0.0.1:9",
            **self.extra_env,
        }

    def loader(self, *args: str) -> subprocess.CompletedProcess[str]:
        return child_processes.run(
            [str(LOADER), *args],
            cwd=self.root,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def start_proxy(self, *args: str) -> RunningProxy:
        """`imageworks-chat-proxy ARGS`, once it answers on `proxy_port`; one that does not
        within 60 s is killed (RuntimeError with its output)."""
        with (self.root / "proxy.out").open("ab") as log:  # the child has its own descriptor
            process = child_processes.popen(
                [str(PROXY), *args],
                cwd=self.root,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        proxy = RunningProxy(f"http://127.0.0.1:{self.proxy_port}", process, self.root)
        self._proxies.append(proxy)
        deadline = time.monotonic() + 60
        while True:
            try:
                proxy.health()
                return proxy
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    proxy.kill()  # one that never answered is not left running
                    raise RuntimeError((self.root / "proxy.out").read_text()) from None
                time.sleep(0.1)

    @contextlib.contextmanager
    def serving(self, *args: str) -> Iterator[RunningProxy]:
        """The proxy for the block: SIGTERM at its end (unless it already exited), and no model
        server left behind."""
        proxy = self.start_proxy(*args)
        try:
            yield proxy
        finally:
            try:
                if proxy.process.poll() is None:
                    proxy.terminate()
            finally:
                self.close()

    def close(self) -> None:
        """Stop every proxy this workspace started that still runs (SIGTERM, then SIGKILL),
        then SIGKILL the model servers on its port: also after a test failed half-way."""
        try:
            for proxy in self._proxies:
                proxy.stop()
        finally:
            self.kill_model_servers()

    def kill_model_servers(self) -> None:
        """Never leave a model behind: SIGKILL every model server on this workspace's port."""
        for pid in processes_listening_on(self.model_port):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


@dataclass
class RunningProxy:
    url: str
    process: subprocess.Popen[bytes]
    workdir: Path

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v1/health", timeout=5)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def chat(self, model: str, **extra: Any) -> httpx.Response:
        payload = {"model": model, "messages": [{"role": "user", "content": "ping"}], **extra}
        return httpx.post(
            f"{self.url}/v1/chat/completions",
            json=payload,
            headers={"Authorization": "Bearer EMPTY"},  # as the runbook's curl sends it
            timeout=180,
        )

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self, timeout_s: float = 30) -> None:
        """End it if it still runs: SIGTERM (it stops its model server), SIGKILL after
        `timeout_s`."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
