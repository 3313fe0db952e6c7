"""Backends we reach but do not manage: any OpenAI-compatible URL, Ollama's `/v1`, or a vLLM we
did not start (single-port orchestration off).

A remote entry (another node running this proxy, a vLLM router, Ray Serve) may name the
environment variable holding its key (`backend_config.api_key_env`) and its own timeouts; the
target carries both, so every call forwarding makes to it is authorised and bounded alike. The
catalog's background check of the remote's `/models` is its health check: while that fails, a
lease is refused at once (`RemoteDown`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from imageworks.backends.autostart import Autostarter
from imageworks.backends.base import (
    BackendNotReady,
    Dialect,
    Outage,
    RemoteDown,
    Target,
    Timeouts,
)
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


def external_target(
    entry: RegistryEntry,
    ollama_host: str,
    loopback_alias: str | None,
    environ: Mapping[str, str] | None = None,
) -> Target:
    """Where `entry` is served. With `api_key_env`, its key is read from `environ` (the
    proxy's environment); a variable that is not set is BackendNotReady naming it."""
    base_url = rewrite_loopback(openai_base_url(entry, ollama_host), loopback_alias)
    model = ollama_tag(entry) if entry.backend == "ollama" else entry.upstream_model_id
    config = entry.backend_config
    return Target(
        base_url=base_url,
        model=model,
        label=f"{entry.backend}:{entry.name}",
        dialect=_DIALECTS.get(entry.backend, Dialect.OPENAI),
        timeouts=Timeouts(
            request_s=config.request_timeout_s,
            stream_idle_s=config.stream_idle_timeout_s,
            connect_s=config.connect_timeout_s,
        ),
        headers=auth_headers(entry, environ or {}),
        key_env=config.api_key_env,
    )


def auth_headers(entry: RegistryEntry, environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """`Authorization` for the entry's remote, if it names a key variable."""
    variable = entry.backend_config.api_key_env
    if variable is None:
        return ()
    key = environ.get(variable, "").strip()
    if not key:
        raise BackendNotReady(missing_key_message(entry.name, variable))
    return (("Authorization", f"Bearer {key}"),)


def missing_key_message(name: str, variable: str) -> str:
    return (
        f"{name}: its remote's key is read from the environment variable {variable}, "
        "which is not set in the proxy's environment"
    )


def down_message(target: Target, outage: Outage) -> str:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(outage.since))
    return (
        f"The remote backend {target.label} at {target.base_url} is unreachable since {since} "
        f"({outage.reason}); it is checked again shortly."
    )


class ExternalBackend:
    """Servers we do not manage: the lease says where the backend is, and if an autostart
    command is configured for the entry, starts it when it is down."""

    def __init__(
        self,
        ollama_host: str,
        loopback_alias: str | None,
        autostarter: Autostarter | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        outage: Callable[[str], Outage | None] = lambda name: None,
    ) -> None:
        self._ollama_host = ollama_host
        self._loopback_alias = loopback_alias
        self._autostarter = autostarter
        self._environ = environ or {}
        self._outage = outage

    @asynccontextmanager
    async def lease(self, entry: RegistryEntry) -> AsyncIterator[Target]:
        target = external_target(entry, self._ollama_host, self._loopback_alias, self._environ)
        if self._autostarter is not None and self._autostarter.has_command(entry.name):
            await self._autostarter.ensure_up(entry.name, target)
        else:
            # Refused at once while the last check failed, rather than tried: a remote host
            # that is down often drops packets, so every request would hold its client for
            # the whole connect timeout, and a queue of them would pile up behind a dead node.
            # The cost is a request refused in the few seconds between the remote's return
            # and the next check; `Retry-After` says when that is. An autostart command, by
            # contrast, is there to bring the backend up on demand, so it is tried.
            outage = self._outage(entry.name)
            if outage is not None:
                raise RemoteDown(
                    down_message(target, outage),
                    retry_after_s=max(1.0, outage.next_check - time.time()),
                )
        yield target
