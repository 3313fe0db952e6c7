"""The proxy's metrics in Prometheus' text format, for `GET /metrics`.

`PrometheusMetrics` keeps its series in a `CollectorRegistry` of its own, never the process-wide
default: one process may build many apps (the tests do), and each counts only its own requests.
Counters and histograms are updated from each finished `RequestRecord` by the request's one
owner (and from the GPU slot's swap callback), all on the event loop. Gauges whose state has an
owner elsewhere (requests in flight in `Metrics`; the GPU slot's queue, holder and phase) are
read from that owner at scrape time, so the two accounts can never drift apart.

Series, all prefixed `imageworks_chat_proxy_`:

    requests_total{model,backend,endpoint,status,outcome}   finished model requests
    request_duration_seconds{model,backend,endpoint}        histogram, arrival to last byte
    time_to_first_token_seconds{model}             histogram, streams that produced a token
    tokens_total{model,kind="prompt"|"completion"} as the backend reported (or we counted)
    overhead_seconds{backend}                      histogram, the proxy's own time (timing.py)
    swaps_total{model}, swap_duration_seconds{model}   model starts on the GPU slot
    requests_in_flight, queue_length{model}, slot_active_requests,
    slot_holder{model} 1, slot_phase{phase} 1|0    gauges, read at scrape time

`model` is the registry entry's logical name. A request that named no registry entry is
counted under one `(unknown)` model (backend `(none)`): client-chosen names must not make
label values without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imageworks.backends.slot import Phase
from imageworks.chat_proxy.observe import RequestRecord

__all__ = ["PREFIX", "SLOT_PHASES", "UNKNOWN_BACKEND", "UNKNOWN_MODEL", "PrometheusMetrics"]

PREFIX = "imageworks_chat_proxy_"
UNKNOWN_MODEL = "(unknown)"
UNKNOWN_BACKEND = "(none)"
# What GpuSlot.status() reports as its "state": "empty" when nothing holds or starts.
SLOT_PHASES = ("empty", *(phase.value for phase in Phase))

# An answer takes from milliseconds (an error) to minutes (a long generation on a slow GPU).
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_SWAP_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


class PrometheusMetrics:
    """The series of one app; `exposition()` is the body of a scrape."""

    def __init__(
        self,
        *,
        slot_status: Callable[[], Mapping[str, object]],
        in_flight: Callable[[], int],
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._requests = Counter(
            PREFIX + "requests",
            "Model requests finished (chat, completions, embeddings, responses: `endpoint` is "
            "the path), by HTTP status (a stream that failed after its headers: the status its "
            "error event carried) and outcome (ok, error, cancelled).",
            ["model", "backend", "endpoint", "status", "outcome"],
            registry=registry,
        )
        self._duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Model requests, from arrival to the last byte of the answer.",
            ["model", "backend", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self._ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Streams, from arrival to the first content or tool-call token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=registry,
        )
        self._tokens = Counter(
            PREFIX + "tokens",
            "Tokens of finished model requests, as their usage reported.",
            ["model", "kind"],
            registry=registry,
        )
        self._overhead = Histogram(
            PREFIX + "overhead_seconds",
            "The proxy's own time per model request until its answer began: neither "
            "waiting for the GPU slot nor waiting on the backend.",
            ["backend"],
            buckets=_OVERHEAD_BUCKETS,
            registry=registry,
        )
        self._swaps = Counter(
            PREFIX + "swaps",
            "Models started on the GPU slot.",
            ["model"],
            registry=registry,
        )
        self._swap_duration = Histogram(
            PREFIX + "swap_duration_seconds",
            "From the start of a model on the GPU slot until it was ready.",
            ["model"],
            buckets=_SWAP_BUCKETS,
            registry=registry,
        )
        registry.register(_SlotCollector(slot_status, in_flight))

    def request_finished(self, record: RequestRecord) -> None:
        model = record.model_resolved or UNKNOWN_MODEL
        backend = record.backend or UNKNOWN_BACKEND
        endpoint = record.endpoint
        self._requests.labels(model, backend, endpoint, str(record.status), record.outcome).inc()
        self._duration.labels(model, backend, endpoint).observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            self._ttft.labels(model).observe(record.ttft_ms / 1000)
        if record.prompt_tokens is not None:
            self._tokens.labels(model, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens is not None:
            self._tokens.labels(model, "completion").inc(record.completion_tokens)
        if record.proxy_ms is not None:
            self._overhead.labels(backend).observe(record.proxy_ms / 1000)

    def swap_finished(self, model: str, seconds: float) -> None:
        self._swaps.labels(model).inc()
        self._swap_duration.labels(model).observe(seconds)

    def exposition(self) -> bytes:
        """Every series in the text format (`prometheus_client.CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)


class _SlotCollector(Collector):
    """Gauges read from their owners at scrape time."""

    def __init__(
        self, slot_status: Callable[[], Mapping[str, object]], in_flight: Callable[[], int]
    ) -> None:
        self._slot_status = slot_status
        self._in_flight = in_flight

    def collect(self) -> Iterable[Metric]:
        status = self._slot_status()
        in_flight = GaugeMetricFamily(
            PREFIX + "requests_in_flight",
            "Chat completions received and not yet finished (waiting for a model included).",
            value=self._in_flight(),
        )
        queue = GaugeMetricFamily(
            PREFIX + "queue_length",
            "Requests waiting for the GPU slot, by the model they wait for (absent: none).",
            labels=["model"],
        )
        waiting = status.get("waiting")
        for model, count in (waiting if isinstance(waiting, dict) else {}).items():
            queue.add_metric([str(model)], float(count))
        active = status.get("active_requests")
        active_requests = GaugeMetricFamily(
            PREFIX + "slot_active_requests",
            "Requests holding the GPU slot's model.",
            value=float(active) if isinstance(active, int) else 0.0,
        )
        holder = GaugeMetricFamily(
            PREFIX + "slot_holder",
            "The model whose process holds the GPU slot (1; absent: none).",
            labels=["model"],
        )
        if isinstance(name := status.get("holder"), str):
            holder.add_metric([name], 1.0)
        phase = GaugeMetricFamily(
            PREFIX + "slot_phase",
            "The GPU slot's phase: 1 for the current one, 0 for the others.",
            labels=["phase"],
        )
        current = status.get("state")
        for known in SLOT_PHASES:
            phase.add_metric([known], 1.0 if known == current else 0.0)
        return [in_flight, queue, active_requests, holder, phase]
