"""`GET /v1/admin/overview`: everything the dashboard shows, in one answer from memory.

The models with their state in the GPU slot (a remote's, or an Ollama entry's: whether its
server answers the background check, and if not since when, why and what to do), the slot
itself (holder and since when, what a swap is doing and for how long, who waits, the last swaps,
the last error with the model server's log tail), recent requests and a per-10-seconds series
for the chart, and the proxy's identity (its `boot_id` changes on every start, which is how the
page sees a restart complete).
"""

from __future__ import annotations

import os
import time
from typing import Any

from imageworks.chat_proxy.catalog import Catalog, CatalogView
from imageworks.chat_proxy.observe import iso_utc
from imageworks.chat_proxy.restart import RestartControl
from imageworks.chat_proxy.services import Services
from imageworks.registry.installed import Installed
from imageworks.registry.naming import display_name

RECENT_REQUESTS = 50
SERIES_BUCKET_S = 10.0
# How the supervisor appends a model server's last words to a failed start's reason.
_LOG_TAIL_MARK = "\n--- last log lines ---\n"


def overview(
    services: Services, view: CatalogView, restart: RestartControl, version: str
) -> dict[str, Any]:
    slot = services.slot.status()
    metrics = services.metrics
    return {
        "proxy": {
            "version": version,
            "boot_id": services.boot_id,
            "pid": os.getpid(),
            "started_at": iso_utc(services.started_at),
            "uptime_s": round(time.time() - services.started_at, 1),
            "restart_mode": restart.mode,
            "restarting": restart.requested,
        },
        "models": _models(view, slot, services.catalog),
        "slot": _slot(slot),
        "requests": {
            "in_flight": metrics.in_flight,
            "recent": metrics.recent(RECENT_REQUESTS),
            "series": metrics.series(SERIES_BUCKET_S),
        },
    }


def _models(view: CatalogView, slot: dict[str, Any], catalog: Catalog) -> list[dict[str, Any]]:
    waiting: dict[str, int] = slot["waiting"]
    models = []
    for entry in view.index.entries:
        installed = view.installed.get(entry.name, Installed.UNKNOWN)
        outage = catalog.outage(entry.name)
        if entry.name == slot["holder"]:
            state = "stopping" if slot["state"] in ("stopping", "stuck") else "active"
        elif entry.name == slot["starting"]:
            state = "loading"
        elif installed is Installed.NO:
            state = "not installed"
        elif outage is not None:
            state = "unreachable"
        else:
            state = "idle"
        capabilities = [name for name, on in entry.declared_capabilities.items() if on]
        models.append(
            {
                "id": view.ids.get(entry.name, display_name(entry)),
                "name": entry.name,
                "backend": entry.backend,
                "format": entry.download_format,
                "quantization": entry.quantization,
                "capabilities": sorted(capabilities),
                "installed": installed is Installed.YES,
                "state": state,
                "waiting": waiting.get(entry.name, 0),
                # The holder's server runs in safe mode: it crashed at load without these.
                "safe_mode": slot["safe_mode"] if entry.name == slot["holder"] else [],
                # A remote, or an Ollama, that does not answer: since when, why (never a key)
                # and, when known, what to do.
                "unreachable": None
                if outage is None
                else {"since": iso_utc(outage.since), "reason": outage.reason, "fix": outage.fix},
            }
        )
    return models


def _slot(status: dict[str, Any]) -> dict[str, Any]:
    since = status["phase_since"]
    error = None
    if status["last_error"]:
        message, _, tail = str(status["last_error"]).partition(_LOG_TAIL_MARK)
        error = {
            "message": message,
            "at": iso_utc(status["last_error_at"]) if status["last_error_at"] else None,
            "model": status["last_error_model"],
            "log_tail": tail,
        }
    return {
        "state": status["state"],
        "activity": status["activity"],
        "holder": status["holder"] or None,
        "starting": status["starting"],
        "holder_since": iso_utc(status["holder_since"]) if status["holder_since"] else None,
        "phase_since": iso_utc(since),
        "phase_elapsed_s": round(max(0.0, time.time() - since), 1),
        "pid": status["pid"],
        "safe_mode": status["safe_mode"],
        "active_requests": status["active_requests"],
        "waiting": status["waiting"],
        "swaps": status["swaps"],
        "last_swaps": [{**swap, "at": iso_utc(swap["at"])} for swap in status["last_swaps"]],
        "last_error": error,
        "history": status["history"],
    }
