"""PrometheusMetrics: finished requests and the GPU slot as Prometheus series, read back with
prometheus-client's own parser."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from imageworks.chat_proxy.observe import RequestRecord
from imageworks.chat_proxy.prometheus import SLOT_PHASES, PrometheusMetrics
from support.prometheus_text import Series, label_sets, parse_series, value

pytestmark = pytest.mark.timeout(10)


CHAT = "/v1/chat/completions"


def _record(**changes: Any) -> RequestRecord:
    base = RequestRecord(
        request_id="req-1",
        started_at=1_700_000_000.0,
        model_requested="chat",
        model_resolved="llama-3-8b",
        backend="llamacpp",
        stream=False,
        status=200,
        outcome="ok",
        latency_ms=1500.0,
        ttft_ms=None,
        prompt_tokens=10,
        completion_tokens=20,
        total_tokens=30,
        error=None,
        queue_ms=0.0,
        upstream_ms=1498.0,
        proxy_ms=2.0,
    )
    return dataclasses.replace(base, **changes)


def _idle_slot() -> dict[str, object]:
    return {"holder": None, "state": "empty", "active_requests": 0, "waiting": {}}


def _prometheus(slot: dict[str, object] | None = None, in_flight: int = 0) -> PrometheusMetrics:
    status = slot or _idle_slot()
    return PrometheusMetrics(slot_status=lambda: status, in_flight=lambda: in_flight)


def _scrape(prometheus: PrometheusMetrics) -> Series:
    return parse_series(prometheus.exposition().decode())


def test_prometheus_counts_requests_by_model_backend_status_and_outcome() -> None:
    prometheus = _prometheus()
    prometheus.request_finished(_record())
    prometheus.request_finished(_record())
    prometheus.request_finished(_record(status=502, outcome="error"))
    series = _scrape(prometheus)
    ok = {
        "model": "llama-3-8b",
        "backend": "llamacpp",
        "endpoint": CHAT,
        "status": "200",
        "outcome": "ok",
    }
    assert value(series, "requests_total", **ok) == 2
    assert value(series, "requests_total", **{**ok, "status": "502", "outcome": "error"}) == 1


def test_prometheus_tells_the_model_endpoints_apart() -> None:
    prometheus = _prometheus()
    prometheus.request_finished(_record())
    prometheus.request_finished(_record(endpoint="/v1/embeddings"))
    prometheus.request_finished(_record(endpoint="/v1/embeddings"))
    series = _scrape(prometheus)
    common = {"model": "llama-3-8b", "backend": "llamacpp"}
    ok = {**common, "status": "200", "outcome": "ok"}
    assert value(series, "requests_total", **ok, endpoint=CHAT) == 1
    assert value(series, "requests_total", **ok, endpoint="/v1/embeddings") == 2
    duration = "request_duration_seconds_count"
    assert value(series, duration, **common, endpoint="/v1/embeddings") == 2


def test_prometheus_duration_histogram_counts_and_sums_in_seconds() -> None:
    prometheus = _prometheus()
    for latency_ms in (80.0, 1500.0, 45_000.0):
        prometheus.request_finished(_record(latency_ms=latency_ms))
    series = _scrape(prometheus)
    labels = {"model": "llama-3-8b", "backend": "llamacpp", "endpoint": CHAT}
    assert value(series, "request_duration_seconds_count", **labels) == 3
    assert value(series, "request_duration_seconds_sum", **labels) == pytest.approx(46.58)
    assert value(series, "request_duration_seconds_bucket", **labels, le="0.1") == 1
    assert value(series, "request_duration_seconds_bucket", **labels, le="2.5") == 2
    assert value(series, "request_duration_seconds_bucket", **labels, le="60.0") == 3
    assert value(series, "request_duration_seconds_bucket", **labels, le="+Inf") == 3


def test_prometheus_ttft_is_observed_for_streams_from_ten_milliseconds() -> None:
    prometheus = _prometheus()
    prometheus.request_finished(_record(stream=True, ttft_ms=8.0))
    prometheus.request_finished(_record(stream=True, ttft_ms=400.0))
    prometheus.request_finished(_record())  # not a stream: no time to first token
    series = _scrape(prometheus)
    assert value(series, "time_to_first_token_seconds_count", model="llama-3-8b") == 2
    ttft_s = value(series, "time_to_first_token_seconds_sum", model="llama-3-8b")
    assert ttft_s == pytest.approx(0.408)
    assert value(series, "time_to_first_token_seconds_bucket", model="llama-3-8b", le="0.01") == 1


def test_prometheus_tokens_add_up_by_kind_and_skip_unknown_counts() -> None:
    prometheus = _prometheus()
    prometheus.request_finished(_record(prompt_tokens=10, completion_tokens=20))
    prometheus.request_finished(_record(prompt_tokens=5, completion_tokens=None))
    series = _scrape(prometheus)
    assert value(series, "tokens_total", model="llama-3-8b", kind="prompt") == 15
    assert value(series, "tokens_total", model="llama-3-8b", kind="completion") == 20


def test_prometheus_unknown_model_names_collapse_into_one_label_value() -> None:
    prometheus = _prometheus()
    for name in ("gpt-4", "x" * 200, "../../etc/passwd", None):
        unresolved = _record(model_requested=name, model_resolved=None, backend=None)
        prometheus.request_finished(dataclasses.replace(unresolved, status=404, outcome="error"))
    series = _scrape(prometheus)
    assert label_sets(series, "requests_total") == [
        {
            "model": "(unknown)",
            "backend": "(none)",
            "endpoint": CHAT,
            "status": "404",
            "outcome": "error",
        }
    ]
    unknown = {"model": "(unknown)", "backend": "(none)", "endpoint": CHAT}
    assert value(series, "request_duration_seconds_count", **unknown)
    assert value(series, "requests_total", **label_sets(series, "requests_total")[0]) == 4


def test_prometheus_overhead_is_observed_only_for_requests_that_were_answered() -> None:
    prometheus = _prometheus()
    prometheus.request_finished(_record(proxy_ms=1.5))
    prometheus.request_finished(_record(proxy_ms=None, status=499, outcome="cancelled"))
    series = _scrape(prometheus)
    assert value(series, "overhead_seconds_count", backend="llamacpp") == 1
    assert value(series, "overhead_seconds_sum", backend="llamacpp") == pytest.approx(0.0015)
    assert value(series, "overhead_seconds_bucket", backend="llamacpp", le="0.0025") == 1
    assert value(series, "overhead_seconds_bucket", backend="llamacpp", le="0.001") == 0


def test_prometheus_swaps_count_and_time_model_starts() -> None:
    prometheus = _prometheus()
    prometheus.swap_finished("smollm2", 4.0)
    prometheus.swap_finished("smollm2", 6.0)
    series = _scrape(prometheus)
    assert value(series, "swaps_total", model="smollm2") == 2
    assert value(series, "swap_duration_seconds_count", model="smollm2") == 2
    assert value(series, "swap_duration_seconds_sum", model="smollm2") == 10
    assert value(series, "swap_duration_seconds_bucket", model="smollm2", le="5.0") == 1


def test_prometheus_slot_gauges_are_read_at_scrape_time() -> None:
    slot: dict[str, object] = _idle_slot()
    prometheus = _prometheus(slot, in_flight=3)
    before = _scrape(prometheus)
    slot.update(holder="smollm2", state="ready", active_requests=2, waiting={"gemma": 2})
    after = _scrape(prometheus)

    assert label_sets(before, "slot_holder") == []
    assert value(before, "slot_phase", phase="empty") == 1
    assert label_sets(before, "queue_length") == []

    assert value(after, "requests_in_flight") == 3
    assert value(after, "slot_active_requests") == 2
    assert value(after, "queue_length", model="gemma") == 2
    assert label_sets(after, "slot_holder") == [{"model": "smollm2"}]
    assert value(after, "slot_holder", model="smollm2") == 1
    phases = {phase: value(after, "slot_phase", phase=phase) for phase in SLOT_PHASES}
    assert phases == {"empty": 0, "starting": 0, "ready": 1, "stopping": 0, "stuck": 0}


def test_prometheus_each_instance_has_a_registry_of_its_own() -> None:
    counted, other = _prometheus(), _prometheus()
    counted.request_finished(_record())
    assert label_sets(_scrape(counted), "requests_total")
    assert label_sets(_scrape(other), "requests_total") == []
