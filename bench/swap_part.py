"""The swap part of a round: a proxy on the demo registry (plus 500 entries) is started, swap
overhead is measured with bench/swap.py's logic, then /v1/models while activations alternate
between the two demo models; the proxy is stopped and no model server is left.

Nothing here is pinned to one core (the caller widens the CPU set): llama-server confined to
one core would measure the pinning, not the swap.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench import swap, targets
from bench.measure import Record, failed
from bench.models_listing import models_during_swap
from bench.processes import Processes, free_port
from bench.targets import CHAT_PATH, Running


def swap_round(procs: Processes, demo: swap.Demo, swaps: int) -> tuple[Record, Record]:
    """(swap overhead record, /v1/models-during-swap record) for one round."""
    model_port = free_port()
    proxy: Running | None = None
    try:
        proxy = targets.start_proxy(
            procs, None, demo.registry, demo.root / "ws", "proxy-demo", model_port
        )
        overhead = _overhead(proxy, demo)
        names = [str(demo.gemma.display_name), str(demo.smol.display_name)]
        during = models_during_swap(proxy.url, names, swaps)
        listing: Record = {
            **during.summary(),
            "problems": during.problems[:10],
            "valid": not during.problems and bool(during.listings),
        }
        if not listing["valid"]:
            listing["error"] = "; ".join(during.problems[:3]) or "no listing fell inside a swap"
        return overhead, listing
    except Exception as exc:  # noqa: BLE001 (invalid records, the run goes on)
        return failed(exc), failed(exc)
    finally:
        if proxy is not None and proxy.server is not None:
            procs.stop(proxy.server)
        swap.kill_listening(model_port, demo.direct_port)


def _overhead(proxy: Running, demo: swap.Demo) -> Record:
    with swap.http_client() as client:
        # the slot must hold smol for `one_round`: the first request loads it
        swap.first_token(client, f"{proxy.url}{CHAT_PATH}", str(demo.smol.display_name))
        samples = swap.Samples()
        argv_same = swap.one_round(client, proxy.url, demo, samples)
    by_direction = swap.overheads(samples)
    record: dict[str, Any] = {
        "overhead_ms": by_direction,
        "overhead_mean_ms": statistics.mean(by_direction.values()),
        "samples_ms": {"/".join(key): value for key, value in samples.values.items()},
        "argv_same_as_direct": argv_same,
        "valid": argv_same,
    }
    if not argv_same:
        record["error"] = "the proxy started a model with another argv than the direct start"
    return record
