"""`GET /v1/models` while the proxy swaps models: the listing must not wait on the GPU slot.

One thread alternates `POST /v1/admin/activate` between the two demo models (each call answers
once the new model is ready, so its duration is the swap); meanwhile this thread sends
`GET /v1/models` on a keep-alive connection, one after another. Only listings that started and
ended inside an activation call count: those are the ones a client would see during a swap.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from bench.http1 import KeepAlive, Timed, request_bytes
from bench.stats import percentile

ACTIVATE_TIMEOUT_S = 120.0


@dataclass
class DuringSwap:
    swaps: int
    listings: list[float] = field(default_factory=list)  # ms, only those inside a swap
    swap_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float | int | None]:
        ordered = sorted(self.listings)
        return {
            "swaps": self.swaps,
            "swap_ms_median": sorted(self.swap_ms)[len(self.swap_ms) // 2]
            if self.swap_ms
            else None,
            "requests_during_swap": len(ordered),
            "p50_ms": percentile(ordered, 50) if ordered else None,
            "p99_ms": percentile(ordered, 99) if ordered else None,
            "max_ms": ordered[-1] if ordered else None,
            "errors": len(self.problems),
        }


def _activate_in_turn(
    url: str, models: list[str], swaps: int, windows: list[tuple[int, int]], problems: list[str]
) -> None:
    with httpx.Client(timeout=ACTIVATE_TIMEOUT_S, trust_env=False) as client:
        for number in range(swaps):
            model = models[number % len(models)]
            began = time.monotonic_ns()
            try:
                answer = client.post(f"{url}/v1/admin/activate", json={"model": model})
            except httpx.HTTPError as exc:
                problems.append(f"activate {model}: {type(exc).__name__}: {exc}")
                continue
            ended = time.monotonic_ns()
            if answer.status_code != 200:
                problems.append(f"activate {model}: HTTP {answer.status_code}")
                continue
            holder = answer.json()["slot"]["holder"]
            windows.append((began, ended))
            if holder is None:
                problems.append(f"activate {model}: the slot holds nothing afterwards")


def models_during_swap(url: str, models: list[str], swaps: int) -> DuringSwap:
    """`swaps` activations, alternating over `models` (the first must not be loaded), while
    listings are timed. Every listing must be a 200 with the entries it had before."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = request_bytes("GET", host, port, "/v1/models")
    result = DuringSwap(swaps)
    expected = len(json.loads(httpx.get(f"{url}/v1/models", trust_env=False).content)["data"])
    windows: list[tuple[int, int]] = []
    swapper = threading.Thread(
        target=_activate_in_turn, args=(url, models, swaps, windows, result.problems)
    )
    client = KeepAlive(host, port)
    timed: list[Timed] = []
    swapper.start()
    try:
        while swapper.is_alive():
            answer = client.send(request)
            timed.append(answer)
            if answer.status != 200:
                result.problems.append(f"GET /v1/models: HTTP {answer.status}")
    finally:
        swapper.join()
        client.close()
    result.swap_ms = [(ended - began) / 1e6 for began, ended in windows]
    for listing in timed:
        if any(
            began <= listing.started_ns and listing.ended_ns <= ended for began, ended in windows
        ):
            result.listings.append(listing.ms)
    after = len(json.loads(httpx.get(f"{url}/v1/models", trust_env=False).content)["data"])
    if after != expected:
        result.problems.append(f"/v1/models listed {expected} entries before, {after} after")
    return result
