"""`GET /metrics` and `Server-Timing` through the real `imageworks-chat-proxy` console script and
a real llama.cpp process serving the SmolLM2 demo model (on CPU).

One proxy with metrics enabled gets a fixed set of requests (an answer, a stream, an unknown
model); the tests read what they left behind, through prometheus-client's own parser."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import make_demo_workspace
from support.prometheus_text import PREFIX as P
from support.prometheus_text import Series, label_sets, parse_series, value
from support.proxy_process import RunningProxy, Workspace

pytestmark = pytest.mark.timeout(180)

SMOL = "smollm2 135m (Q4 1)"  # the demo model, as clients name it
SMOL_ENTRY = "smollm2_135m_(Q4_1)"  # the registry entry's logical name: the `model` label


@dataclass
class Traffic:
    answer: httpx.Response
    stream: httpx.Response
    stream_usage: dict[str, int]
    unknown: httpx.Response
    others: dict[str, httpx.Response]  # path -> response, after the chat requests
    scrape: httpx.Response
    series: Series


def _server_timing(response: httpx.Response) -> dict[str, float]:
    """`name;dur=<ms>` entries, comma-separated; fails unless every entry is well formed."""
    entries: dict[str, float] = {}
    for entry in response.headers["server-timing"].split(","):
        match = re.fullmatch(r"\s*([a-z]+);dur=(\d+(?:\.\d+)?)\s*", entry)
        assert match, response.headers["server-timing"]
        entries[match[1]] = float(match[2])
    return entries


def _stream(proxy: RunningProxy) -> tuple[httpx.Response, dict[str, int]]:
    payload = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "ping"}],
        "max_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST", f"{proxy.url}/v1/chat/completions", json=payload, timeout=120
    ) as response:
        data = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    usages = [chunk["usage"] for chunk in map(json.loads, data[:-1]) if chunk.get("usage")]
    return response, usages[-1]


def _scrape_when_settled(proxy: RunningProxy, requests: int) -> httpx.Response:
    """A scrape once all `requests` are counted: a request is recorded just after its last
    byte went out, so a scrape right after the client read it may be early."""
    deadline = time.monotonic() + 10
    while True:
        scrape = httpx.get(f"{proxy.url}/metrics", timeout=10)
        series = parse_series(scrape.text)
        counted = sum(value for (name, _), value in series.items() if name == P + "requests_total")
        if counted >= requests or time.monotonic() > deadline:
            return scrape
        time.sleep(0.05)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Traffic]:
    workdir = tmp_path_factory.mktemp("proxy")
    make_demo_workspace(workdir, demo_models)
    workspace = Workspace(workdir, extra_env={"CHAT_PROXY_ENABLE_METRICS": "1"})
    with workspace.serving() as proxy:
        answer = proxy.chat(SMOL, max_tokens=8)  # starts the model: the one swap
        stream, stream_usage = _stream(proxy)
        unknown = proxy.chat("no such model")
        scrape = _scrape_when_settled(proxy, requests=3)
        others = {
            path: httpx.get(f"{proxy.url}{path}", timeout=10)
            for path in ("/v1/health", "/v1/models", "/v1/metrics", "/v1/nothing", "/metrics")
        }
        yield Traffic(
            answer, stream, stream_usage, unknown, others, scrape, parse_series(scrape.text)
        )


def test_metrics_is_prometheus_text(traffic: Traffic) -> None:
    assert traffic.scrape.status_code == 200
    assert traffic.scrape.headers["content-type"].startswith("text/plain; version=")


def test_metrics_counts_requests_by_model_backend_and_status(traffic: Traffic) -> None:
    assert (traffic.answer.status_code, traffic.stream.status_code) == (200, 200)
    assert traffic.unknown.status_code == 404
    chat = "/v1/chat/completions"
    ok = {
        "model": SMOL_ENTRY,
        "backend": "llamacpp",
        "endpoint": chat,
        "status": "200",
        "outcome": "ok",
    }
    unknown = {
        "model": "(unknown)",
        "backend": "(none)",
        "endpoint": chat,
        "status": "404",
        "outcome": "error",
    }
    labelled = label_sets(traffic.series, "requests_total")
    assert len(labelled) == 2
    assert ok in labelled
    assert unknown in labelled
    assert value(traffic.series, "requests_total", **ok) == 2
    assert value(traffic.series, "requests_total", **unknown) == 1


def test_metrics_duration_and_ttft_histograms_count_the_requests(traffic: Traffic) -> None:
    series = traffic.series
    chat = "/v1/chat/completions"
    smol = {"model": SMOL_ENTRY, "backend": "llamacpp", "endpoint": chat}
    assert value(series, "request_duration_seconds_count", **smol) == 2
    assert value(series, "request_duration_seconds_bucket", **smol, le="+Inf") == 2
    duration = value(series, "request_duration_seconds_sum", **smol)
    assert duration is not None
    assert duration > 0
    unknown = {"model": "(unknown)", "backend": "(none)", "endpoint": chat}
    assert value(series, "request_duration_seconds_count", **unknown)
    assert value(series, "time_to_first_token_seconds_count", model=SMOL_ENTRY) == 1  # the stream
    assert value(series, "overhead_seconds_count", backend="llamacpp") == 2


def test_metrics_tokens_are_the_usage_the_answers_reported(traffic: Traffic) -> None:
    usages = [traffic.answer.json()["usage"], traffic.stream_usage]
    for kind in ("prompt", "completion"):
        reported = sum(usage[f"{kind}_tokens"] for usage in usages)
        assert reported > 0
        assert value(traffic.series, "tokens_total", model=SMOL_ENTRY, kind=kind) == reported


def test_metrics_gauges_show_the_slot_after_the_requests(traffic: Traffic) -> None:
    series = traffic.series
    assert value(series, "requests_in_flight") == 0
    assert value(series, "slot_active_requests") == 0
    assert label_sets(series, "queue_length") == []
    assert label_sets(series, "slot_holder") == [{"model": SMOL_ENTRY}]
    assert value(series, "slot_holder", model=SMOL_ENTRY) == 1
    assert value(series, "slot_phase", phase="ready") == 1
    assert value(series, "slot_phase", phase="starting") == 0
    swaps = value(series, "swaps_total", model=SMOL_ENTRY)
    assert swaps is not None
    assert swaps >= 1
    assert value(series, "swap_duration_seconds_count", model=SMOL_ENTRY) == swaps


def test_server_timing_of_answers_splits_queue_upstream_and_proxy(traffic: Traffic) -> None:
    for response in (traffic.answer, traffic.stream):
        timing = _server_timing(response)
        assert list(timing) == ["queue", "upstream", "proxy"]
        assert timing["upstream"] > 0
        assert timing["proxy"] >= 0
    # The first answer waited for the model to start: the swap is inside its queue time.
    swap_s = value(traffic.series, "swap_duration_seconds_sum", model=SMOL_ENTRY)
    assert swap_s is not None
    assert _server_timing(traffic.answer)["queue"] >= swap_s * 1000 - 1


def test_server_timing_of_every_other_response_is_the_proxy_alone(traffic: Traffic) -> None:
    responses = {"unknown model": traffic.unknown, "/metrics": traffic.scrape, **traffic.others}
    for name, response in responses.items():
        assert list(_server_timing(response)) == ["proxy"], name


def test_v1_metrics_keeps_its_json(traffic: Traffic) -> None:
    response = traffic.others["/v1/metrics"]
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    assert body["overall"]["requests"] == 3
    assert body["overall"]["in_flight"] == 0
    assert body["slot"]["holder"] == SMOL_ENTRY
