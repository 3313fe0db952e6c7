"""How `current-model` and `activate-model` describe the managed port to a person.

Two sources: the state file's record (no proxy runs) and a running proxy's `/v1/admin/status`
(its GPU slot, plus the state file as it reads it). Either way the answer is one sentence when
nothing is active, else a short block: names, backend, pid, port, phase, since when, the
command, the log, and where the answer came from. Pure: no I/O, the clock is passed in.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from imageworks.backends.state import ManagedState

DisplayName = Callable[[str], str | None]  # logical name -> display name (None: not in registry)

_LABEL_WIDTH = 14


def nothing_active(port: int, url: str | None = None) -> str:
    said = f" (according to the proxy at {url})" if url else ""
    return f"No model is active on port {port}{said}.\n"


def describe_record(
    state: ManagedState | None, *, port: int, source: str, names: DisplayName, now: datetime
) -> str:
    """The state file's record (`source` says which file, and that no proxy answered)."""
    if state is None:
        return nothing_active(port)
    rows = [
        ("backend", state.backend),
        ("pid", str(state.pid)),
        ("port", str(state.port)),
        ("phase", state.phase),
        ("since", _since(_parse(state.started_at), now)),
        ("started by", state.owner),
        ("command", shlex.join(state.command)),
        ("log", state.log_path),
        ("source", source),
    ]
    return _block(state.entry, state.port, names, rows)


def describe_status(
    status: Mapping[str, Any], *, url: str, port: int, names: DisplayName, now: datetime
) -> str:
    """A proxy's `/v1/admin/status`: its GPU slot, filled in from the record of the same model."""
    slot = _mapping(status.get("slot"))
    holder = slot.get("holder") or slot.get("starting")
    if not isinstance(holder, str):
        return nothing_active(port, url)
    if holder.startswith("@ollama "):  # the slot's name for "Ollama holds the GPU"
        root = holder.removeprefix("@ollama ")
        return (
            f"No model server is active on port {port}: Ollama at {root} holds the GPU "
            f"(according to the proxy at {url}).\n"
        )
    record = _mapping(status.get("state_file"))
    if record.get("entry") != holder:
        record = {}
    phase = str(slot.get("state") or record.get("phase") or "-")
    activity = slot.get("activity")
    if isinstance(activity, str) and activity not in (phase, "idle"):
        phase = f"{phase} ({activity})"
    started = _parse(record["started_at"]) if record.get("started_at") else None
    since = slot.get("holder_since")
    if started is None and isinstance(since, int | float):
        started = datetime.fromtimestamp(since, UTC)
    waiting = _mapping(slot.get("waiting"))
    queued = sum(n for n in waiting.values() if isinstance(n, int))
    rows = [
        ("backend", str(record.get("backend") or "-")),
        ("pid", str(slot.get("pid") or record.get("pid") or "-")),
        ("port", str(record.get("port") or port)),
        ("phase", phase),
        ("since", _since(started, now) if started else "-"),
        ("command", shlex.join(record["command"]) if record.get("command") else "-"),
        ("log", str(record.get("log_path") or "-")),
        ("requests", f"{slot.get('active_requests', 0)} running, {queued} waiting"),
    ]
    if slot.get("last_error"):
        rows.append(("last error", str(slot["last_error"])))
    rows.append(("source", f"the GPU slot of the proxy at {url}"))
    return _block(holder, int(record.get("port") or port), names, rows)


def _block(entry: str, port: int, names: DisplayName, rows: list[tuple[str, str]]) -> str:
    display = names(entry)
    title = display or entry
    if display and display != entry:
        rows = [("logical name", entry), *rows]
    lines = [f"{title} is active on port {port}."]
    lines += [f"  {label:<{_LABEL_WIDTH}}{value}" for label, value in rows]
    return "\n".join(lines) + "\n"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _parse(stamp: str) -> datetime | None:
    try:
        return datetime.fromisoformat(stamp)
    except ValueError:
        return None


def _since(started: datetime | None, now: datetime) -> str:
    if started is None:
        return "-"
    local = started.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"{local} (up {age(max(0.0, (now - started).total_seconds()))})"


def age(seconds: float) -> str:
    """`45s`, `3m 12s`, `2h 05m`, `3d 4h`: two units at most."""
    whole = int(seconds)
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
