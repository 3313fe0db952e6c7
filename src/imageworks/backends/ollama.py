"""Ollama as a GPU neighbour: is it reachable, what does it hold in VRAM, and make it let go.

Errors (all are `BackendNotReady`, so an unhandled one becomes a 503):

    OllamaError            Ollama answered, but not as expected (an error status, odd JSON,
     |                     or it refused to unload a model)
     +-- OllamaUnavailable Ollama cannot be reached: connection refused, reset or timed out
     +-- OllamaUnloadTimeout models were still loaded when the unload bound ran out

This module never decides what "unreachable" means: the GPU slot may treat it as "nothing of
Ollama's is in VRAM" and go on; a request for an Ollama model answers 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from imageworks.backends.base import BackendNotReady

log = logging.getLogger("imageworks.backends.ollama")


class OllamaError(BackendNotReady):
    """Ollama answered, but not in a way we can use."""


class OllamaUnavailable(OllamaError):
    """Ollama cannot be reached at its URL."""


class OllamaUnloadTimeout(OllamaError):
    """Models were still loaded in Ollama when the unload bound ran out."""


class OllamaManager:
    """Talks to Ollama's management API through the shared client; every request is bounded by
    `request_timeout_s`, and `unload_all` as a whole by about `unload_timeout_s` more."""

    def __init__(
        self,
        base_url: str,
        client: httpx.AsyncClient,
        *,
        request_timeout_s: float = 5.0,
        unload_timeout_s: float = 30.0,
        poll_interval_s: float = 0.25,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client
        self._request_timeout_s = request_timeout_s
        self._unload_timeout_s = unload_timeout_s
        self._poll_interval_s = poll_interval_s
        self._unloading = asyncio.Lock()  # one unload at a time; a second caller then sees []

    async def version(self) -> str:
        """Ollama's version (GET /api/version); also the reachability check."""
        body = await self._get_json("/api/version")
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, str):
            raise OllamaError(f"Ollama at {self.base_url} sent no version from /api/version")
        return version

    async def loaded_models(self) -> list[str]:
        """Names of the models Ollama holds in memory now (GET /api/ps), in its order."""
        return await self._model_names("/api/ps")

    async def installed_models(self) -> list[str]:
        """Names of the models Ollama has pulled (GET /api/tags)."""
        return await self._model_names("/api/tags")

    async def unload_all(self) -> list[str]:
        """Ask Ollama to unload every loaded model (also any loaded meanwhile) and return once
        /api/ps is empty. Returns the names unloaded, in the order they were asked to go."""
        async with self._unloading:
            started = time.monotonic()
            deadline = started + self._unload_timeout_s
            asked: list[str] = []
            while loaded := await self.loaded_models():
                refused: list[str] = []
                for name in [name for name in loaded if name not in asked]:
                    asked.append(name)
                    if status := await self._unload(name):
                        refused.append(f"{name} ({status})")
                if refused:
                    raise OllamaError(
                        f"Ollama at {self.base_url} refused to unload {', '.join(refused)}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise OllamaUnloadTimeout(
                        f"Ollama at {self.base_url} still holds {', '.join(loaded)} after "
                        f"{self._unload_timeout_s:g} s"
                    )
                await asyncio.sleep(min(self._poll_interval_s, remaining))
            if asked:
                took = time.monotonic() - started
                log.info("unloaded Ollama models %s in %.2f s", ", ".join(asked), took)
            return asked

    async def _unload(self, name: str) -> str:
        """Ollama's documented unload: a bare generate with keep_alive 0, else the chat form.
        Returns "" when accepted, else how both were refused."""
        reply = await self._request("POST", "/api/generate", {"model": name, "keep_alive": 0})
        if reply.is_success:
            return ""
        log.debug("Ollama refused /api/generate unload of %s (HTTP %d)", name, reply.status_code)
        body = {"model": name, "messages": [], "keep_alive": 0}
        retry = await self._request("POST", "/api/chat", body)
        if retry.is_success:
            return ""
        return f"HTTP {reply.status_code}, then HTTP {retry.status_code}"

    async def _model_names(self, path: str) -> list[str]:
        body = await self._get_json(path)
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise OllamaError(f"Ollama at {self.base_url} sent no model list from {path}")
        names = [m.get("name") or m.get("model") for m in models if isinstance(m, dict)]
        return [name for name in names if isinstance(name, str) and name]

    async def _get_json(self, path: str) -> Any:
        reply = await self._request("GET", path)
        if not reply.is_success:
            raise OllamaError(f"Ollama at {self.base_url} answered {path} with {reply.status_code}")
        try:
            return reply.json()
        except ValueError as exc:
            raise OllamaError(f"Ollama at {self.base_url} sent invalid JSON from {path}") from exc

    async def _request(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """The one place transport errors become OllamaUnavailable."""
        try:
            return await self._client.request(
                method, self.base_url + path, json=body, timeout=self._request_timeout_s
            )
        except httpx.TransportError as exc:
            kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "is unreachable"
            raise OllamaUnavailable(
                f"Ollama at {self.base_url} {kind} ({method} {path}: {type(exc).__name__})"
            ) from exc
