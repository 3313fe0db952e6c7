"""What the proxy learns about one request as it goes, turned into its log record."""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from imageworks.chat_proxy.observe import Outcome, RequestRecord
from imageworks.chat_proxy.timing import RequestTiming
from imageworks.registry.schema import RegistryEntry

# Status recorded for a request whose client left before the answer (nginx's convention).
CLIENT_CLOSED = 499

# Request ids: this process's random prefix and a counter, 16 hex digits in all. Unique within
# a run, and across restarts but for a 1 in 2**32 chance, without a uuid4's urandom call.
_RUN = secrets.token_hex(4)
_SERIAL = itertools.count()


def new_request_id() -> str:
    return f"req-{_RUN}{next(_SERIAL) & 0xFFFFFFFF:08x}"


@dataclass
class Exchange:
    """What we learn about one request as it goes, for the log line and the metrics.

    Its outcome is "cancelled" until `end` says otherwise: a request that stops without an
    answer (the client left, the server shut down) is one the client abandoned."""

    request_id: str = field(default_factory=new_request_id)
    endpoint: str = "/v1/chat/completions"  # the path the client posted to
    started_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    model_requested: str | None = None
    entry: RegistryEntry | None = None
    stream: bool = False
    first_token: float | None = None
    usage: dict[str, Any] | None = None
    prompt: Any = None
    response: Any = None  # a non-streamed answer's choices (logged only with log_prompts)
    response_text: list[str] = field(default_factory=list)  # a streamed answer's text pieces
    status: int = CLIENT_CLOSED
    outcome: Outcome = "cancelled"
    error: str | None = "client disconnected"
    ended: bool = False
    timing: RequestTiming = field(default_factory=RequestTiming)  # the middleware's, if it runs
    # The last `sequence_number` a Responses API stream relayed (its error event comes next).
    sequence: int | None = None
    safe_mode: tuple[str, ...] = ()  # the model server ran in safe mode with these arguments

    def end(self, status: int, outcome: Outcome, error: str | None = None) -> None:
        """Settle the outcome; the first call wins (an answer that was sent stays sent)."""
        if not self.ended:
            self.status, self.outcome, self.error, self.ended = status, outcome, error, True

    def record(self, log_prompts: bool) -> RequestRecord:
        now = time.perf_counter()
        usage = self.usage or {}
        timing = self.timing
        return RequestRecord(
            request_id=self.request_id,
            endpoint=self.endpoint,
            started_at=self.started_at,
            model_requested=self.model_requested,
            model_resolved=self.entry.name if self.entry else None,
            backend=self.entry.backend if self.entry else None,
            stream=self.stream,
            status=self.status,
            outcome=self.outcome,
            latency_ms=(now - self.started) * 1000,
            ttft_ms=(self.first_token - self.started) * 1000 if self.first_token else None,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
            total_tokens=_count(usage.get("total_tokens")),
            error=self.error,
            prompt=self.prompt if log_prompts else None,
            response=(self.response or "".join(self.response_text)) if log_prompts else None,
            queue_ms=_ms(timing.queue.total_s),
            upstream_ms=_ms(timing.upstream.total_s),
            proxy_ms=_ms(timing.proxy_s()),
            safe_mode=self.safe_mode,
        )


def usage_of(body: dict[str, Any]) -> dict[str, Any] | None:
    usage = body.get("usage")
    return usage if isinstance(usage, dict) else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
