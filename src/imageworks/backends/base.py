"""What the proxy needs from a backend: where to send a request, and a lease that keeps the
backend ready while the request runs."""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from imageworks.registry.schema import RegistryEntry


class Dialect(enum.Enum):
    """Which server answers at a target, for what the OpenAI API leaves to each server (how it
    takes structured output, which tokenizer endpoints it has). Set by the backend that leases
    the target: it knows what it started or where it points."""

    OPENAI = "openai"  # an OpenAI-compatible server we know nothing more about
    LLAMA_SERVER = "llama-server"  # llama.cpp's own server
    LLAMA_CPP_PYTHON = "llama-cpp-python"  # `python -m llama_cpp.server`
    VLLM = "vllm"
    OLLAMA = "ollama"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """An entry's own limits (`backend_config`); None: the proxy-wide one."""

    request_s: float | None = None  # a whole non-streaming answer, and a stream's headers
    stream_idle_s: float | None = None  # the longest silence inside a stream
    connect_s: float | None = None  # opening the connection


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes."""

    base_url: str  # OpenAI base, ending in /v1
    model: str  # the `model` value this backend expects
    label: str  # how errors and logs name the backend, e.g. "llamacpp:smollm2_135m_(Q4_1)"
    # Why the backend was taken away in the middle of this request (a swap after the drain
    # timeout), so a failure can say so instead of "connection closed".
    preempted: Callable[[], str | None] = lambda: None
    dialect: Dialect = Dialect.OPENAI
    timeouts: Timeouts = Timeouts()
    # Sent with every call to this backend, e.g. `Authorization` for a remote that wants a key.
    # Kept out of the repr: a target in a log line or a traceback must not show a key.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # The environment variable the key came from: how errors name the key without showing it.
    key_env: str | None = None
    # The model server runs in safe mode (these arguments added): recorded with each request.
    safe_mode: tuple[str, ...] = ()


class Backend(Protocol):
    def lease(self, entry: RegistryEntry) -> AbstractAsyncContextManager[Target]:
        """Make the entry's backend ready (start it if we manage it) and keep it so until the
        context exits. Raises BackendNotReady when it cannot be made ready."""
        ...


class BackendNotReady(Exception):
    """The entry's backend cannot serve it now: a start failed, its weights are missing, or the
    backend kind is unknown. The message says which and why (the proxy answers 503)."""


class BackendBusy(BackendNotReady):
    """The request waited longer than the queue timeout for the GPU slot (another model was
    draining, stopping or starting). Worth retrying: `retry_after_s` is a fair guess at when
    (the proxy answers 503 with a `Retry-After` header)."""

    code = "queue_timeout"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RemoteDown(BackendBusy):
    """The remote's last health check failed: the request is refused at once (503 with
    `Retry-After` until the next check) instead of waiting on a dead host. Its code is the one
    a failed connection has, as it is the same failure, only seen by the check first."""

    code = "backend_unreachable"


@dataclass(frozen=True, slots=True)
class Outage:
    """An entry's failing health check (a remote's, or its Ollama's): since when (epoch
    seconds), why (never a key), when it is checked next (epoch seconds), and what to do when
    that is known."""

    since: float
    reason: str
    next_check: float
    fix: str | None = None
