"""What the proxy needs from a backend: where to send a request, and a lease that keeps the
backend ready while the request runs."""

from __future__ import annotations

import enum
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
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
class Target:
    """Where one request goes."""

    base_url: str  # OpenAI base, ending in /v1
    model: str  # the `model` value this backend expects
    label: str  # how errors and logs name the backend, e.g. "llamacpp:smollm2_135m_(Q4_1)"
    # Why the backend was taken away in the middle of this request (a swap after the drain
    # timeout), so a failure can say so instead of "connection closed".
    preempted: Callable[[], str | None] = lambda: None
    dialect: Dialect = Dialect.OPENAI


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

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
