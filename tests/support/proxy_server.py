"""Run the real proxy app (lifespan included) on a loopback port in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn

from imageworks.chat_proxy.app import create_app
from imageworks.chat_proxy.config import ProxySettings
from imageworks.config import RegistrySettings


class ProxyServer:
    def __init__(self, registry_dir: Path, tmp_path: Path, **settings: Any) -> None:
        defaults: dict[str, Any] = {
            "log_path": tmp_path / "logs" / "chat_proxy.jsonl",
            "backend_log_dir": tmp_path / "logs",
            "vllm_state_path": tmp_path / "_staging" / "active_vllm.json",
        }
        self.settings = ProxySettings(**{**defaults, **settings})
        registry = RegistrySettings(registry_dir=registry_dir, ollama_host="http://127.0.0.1:9")
        self.app = create_app(self.settings, registry)
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (else ~40 ms stalls)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def log_path(self) -> Path:
        return self.settings.log_path

    def __enter__(self) -> ProxyServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the proxy did not start")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
        self._socket.close()
