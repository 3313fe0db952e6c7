"""Run the real proxy app (lifespan included) on a loopback port in a background thread."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

from imageworks.chat_proxy.app import create_app
from imageworks.chat_proxy.config import ProxySettings
from imageworks.config import RegistrySettings
from support.threaded_server import ThreadedServer


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
        self._runner = ThreadedServer(self.app, "proxy", lifespan="on")
        self.url = self._runner.url

    @property
    def log_path(self) -> Path:
        return self.settings.log_path

    def __enter__(self) -> ProxyServer:
        self._runner.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._runner.stop()
