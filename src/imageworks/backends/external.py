"""Backends we reach but do not manage: any OpenAI-compatible URL, Ollama's `/v1`, or a vLLM we
did not start (single-port orchestration off)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from imageworks.backends.autostart import Autostarter
from imageworks.backends.base import Dialect, Target
from imageworks.registry.endpoints import ollama_tag, openai_base_url
from imageworks.registry.schema import RegistryEntry

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# The servers an entry's `backend` names; `external` is any OpenAI-compatible server.
_DIALECTS = {"vllm": Dialect.VLLM, "ollama": Dialect.OLLAMA}


def rewrite_loopback(url: str, alias: str | None) -> str:
    """Point a loopback URL at `alias` (e.g. host.docker.internal when the proxy runs in a
    container), keeping scheme, credentials, port and path; other URLs are left alone."""
    if not alias:
        return url
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK_HOSTS:
        return url
    alias_parts = urlsplit(f"//{alias}")
    host = alias_parts.hostname or alias
    port = alias_parts.port or parts.port
    credentials = url_credentials(parts.username, parts.password)
    netloc = f"{credentials}{host}" + (f":{port}" if port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def url_credentials(username: str | None, password: str | None) -> str:
    if username is None:
        return ""
    return f"{username}:{password}@" if password is not None else f"{username}@"


def external_target(entry: RegistryEntry, ollama_host: str, loopback_alias: str | None) -> Target:
    base_url = rewrite_loopback(openai_base_url(entry, ollama_host), loopback_alias)
    model = ollama_tag(entry) if entry.backend == "ollama" else entry.upstream_model_id
    return Target(
        base_url=base_url,
        model=model,
        label=f"{entry.backend}:{entry.name}",
        dialect=_DIALECTS.get(entry.backend, Dialect.OPENAI),
    )


class ExternalBackend:
    """Servers we do not manage: the lease says where the backend is, and if an autostart
    command is configured for the entry, starts it when it is down."""

    def __init__(
        self,
        ollama_host: str,
        loopback_alias: str | None,
        autostarter: Autostarter | None = None,
    ) -> None:
        self._ollama_host = ollama_host
        self._loopback_alias = loopback_alias
        self._autostarter = autostarter

    @asynccontextmanager
    async def lease(self, entry: RegistryEntry) -> AsyncIterator[Target]:
        target = external_target(entry, self._ollama_host, self._loopback_alias)
        if self._autostarter is not None and self._autostarter.has_command(entry.name):
            await self._autostarter.ensure_up(entry.name, target)
        yield target
