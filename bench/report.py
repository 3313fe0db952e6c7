"""From per-round measurements to the medians, the pass/miss marks and the printed table.

Each number in the table is the median over rounds of that round's value; "added" numbers are
taken within a round (target minus direct, both measured moments apart) before the median, so
slow drift of the machine cancels. A measurement that had errors (non-2xx, socket errors, a
broken stream) is not a value: its cell says ERR and the reasons are listed under the table.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.stats import median_or_none

Record = dict[str, Any]
Rounds = list[dict[str, dict[str, Record]]]


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    decimals: int
    target: tuple[str, float] | None = None  # ("<=", 0.5): what this proxy must meet


COLUMNS = (
    Column("c1_p50_ms", "c1 p50", 3),
    Column("c1_p99_ms", "c1 p99", 3),
    Column("c1_added_p50_ms", "c1 +p50", 3, ("<=", 0.5)),
    Column("c1_added_p99_ms", "c1 +p99", 3, ("<=", 1.5)),
    Column("c32_rps", "c32 req/s", 0, (">=", 2500)),
    Column("c32_p99_ms", "c32 p99", 2, ("<=", 40)),
    Column("stream_ttft_p50_ms", "TTFT p50", 2),
    Column("chunk_added_p50_ms", "chunk +p50", 3, ("<=", 0.2)),
    Column("chunk_added_p99_ms", "chunk +p99", 3, ("<=", 0.5)),
    Column("models_p50_ms", "models p50", 3, ("<=", 2)),
    Column("models_swap_p50_ms", "in swap p50", 3, ("<=", 2)),
    Column("rss_idle_mb", "RSS MB", 1, ("<=", 80)),
    Column("rss_growth_pct", "RSS grow%", 2, ("<", 5)),
    Column("rss_growth_warm_pct", "warm grow%", 2),
    Column("swap_overhead_ms", "swap +ms", 0),
)
UNITS = (
    "ms, except req/s, MB (10^6 bytes, VmRSS summed over the process tree) and %; "
    "+ = added over direct in the same round; models = GET /v1/models with 500 entries "
    "(idle, and while a swap is in progress); swap + = first token after a switch minus the "
    "model server's own spawn-to-first-token (mean of both directions)"
)
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
}
PROXY = "proxy"


def _valid(record: Record | None) -> bool:
    return record is not None and bool(record.get("valid"))


def _per_round(
    rounds: Rounds, metric: str, target: str, value: Callable[[Record], float | None]
) -> tuple[list[float | None], bool]:
    """The value of `metric` for `target` in each round, and whether any round was invalid."""
    values: list[float | None] = []
    invalid = False
    for measured in rounds:
        record = measured.get(metric, {}).get(target)
        if record is None:
            continue
        if not _valid(record):
            invalid = True
            continue
        values.append(value(record))
    return values, invalid


def _added(
    rounds: Rounds, metric: str, target: str, field: str, scale: float = 1.0
) -> tuple[list[float | None], bool]:
    values: list[float | None] = []
    invalid = False
    for measured in rounds:
        record = measured.get(metric, {}).get(target)
        direct = measured.get(metric, {}).get("direct")
        if record is None or direct is None:
            continue
        if not (_valid(record) and _valid(direct)):
            invalid = True
            continue
        values.append((record[field] - direct[field]) * scale)
    return values, invalid


def _field(name: str) -> Callable[[Record], float | None]:
    return lambda record: record.get(name)


def summarize(rounds: Rounds, rss: dict[str, Record], targets: list[str]) -> dict[str, Record]:
    """Per target: column key -> median value, None (not measured) or "ERR"."""
    summary: dict[str, Record] = {}
    for target in targets:
        cells: dict[str, Any] = {}

        def put(key: str, found: tuple[list[float | None], bool], cells: Record = cells) -> None:
            values, invalid = found
            cells[key] = "ERR" if invalid else median_or_none(values)

        put("c1_p50_ms", _per_round(rounds, "c1", target, _field("p50_ms")))
        put("c1_p99_ms", _per_round(rounds, "c1", target, _field("p99_ms")))
        if target != "direct":
            put("c1_added_p50_ms", _added(rounds, "c1", target, "p50_ms"))
            put("c1_added_p99_ms", _added(rounds, "c1", target, "p99_ms"))
            put("chunk_added_p50_ms", _added(rounds, "stream", target, "transit_p50_us", 1e-3))
            put("chunk_added_p99_ms", _added(rounds, "stream", target, "transit_p99_us", 1e-3))
        put("c32_rps", _per_round(rounds, "c32", target, _field("rps")))
        put("c32_p99_ms", _per_round(rounds, "c32", target, _field("p99_ms")))
        put("stream_ttft_p50_ms", _per_round(rounds, "stream", target, _field("ttft_p50_ms")))
        put(
            "stream_transit_p50_ms",
            _per_round(rounds, "stream", target, lambda r: r["transit_p50_us"] / 1000),
        )
        put(
            "stream_transit_p99_ms",
            _per_round(rounds, "stream", target, lambda r: r["transit_p99_us"] / 1000),
        )
        put("models_p50_ms", _per_round(rounds, "models", target, _field("p50_ms")))
        put("models_p99_ms", _per_round(rounds, "models", target, _field("p99_ms")))
        put("models_swap_p50_ms", _per_round(rounds, "models_swap", target, _field("p50_ms")))
        put("models_swap_p99_ms", _per_round(rounds, "models_swap", target, _field("p99_ms")))
        put("swap_overhead_ms", _per_round(rounds, "swap", target, _field("overhead_mean_ms")))
        directions: dict[str, list[float | None]] = {}
        for measured in rounds:
            swapped = measured.get("swap", {}).get(target)
            if swapped is not None and _valid(swapped):
                for direction, ms in swapped["overhead_ms"].items():
                    directions.setdefault(direction, []).append(ms)
        if directions:
            cells["swap_overhead_by_direction_ms"] = {
                direction: median_or_none(values) for direction, values in directions.items()
            }
        memory = rss.get(target)
        if memory is not None:
            ok = bool(memory.get("valid"))
            cells["rss_idle_mb"] = memory["idle_mb"] if ok else "ERR"
            cells["rss_after_mb"] = memory["after_mb"] if ok else "ERR"
            cells["rss_growth_pct"] = memory["growth_pct"] if ok else "ERR"
            cells["rss_warm_mb"] = memory.get("warm_mb") if ok else "ERR"
            cells["rss_growth_warm_pct"] = memory.get("growth_after_warm_pct") if ok else "ERR"
            cells["rss_requests"] = memory.get("requests")
            cells["rss_capped"] = bool(memory.get("capped_at_s"))
        summary[target] = {key: value for key, value in cells.items() if value is not None}
    return summary


def verdicts(summary: dict[str, Record]) -> dict[str, str]:
    """This proxy against each target: "pass", "miss", "invalid" or "not measured"."""
    cells = summary.get(PROXY, {})
    found: dict[str, str] = {}
    for column in COLUMNS:
        if column.target is None:
            continue
        value = cells.get(column.key)
        if value is None:
            found[column.key] = "not measured"
        elif value == "ERR":
            found[column.key] = "invalid"
        else:
            sign, limit = column.target
            found[column.key] = "pass" if _COMPARE[sign](float(value), limit) else "miss"
    return found


def _cell(value: Any, decimals: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:.{decimals}f}"


def table(labels: dict[str, str], summary: dict[str, Record], notes: dict[str, str]) -> str:
    """One row per target, a target row and this proxy's pass/miss row; a skipped target's
    row carries its note instead of numbers."""
    width = max(len(column.header) for column in COLUMNS) + 1
    label_width = max(28, *(len(label) + 1 for label in labels.values()))
    lines = [f"{'':<{label_width}}" + "".join(f"{c.header:>{width}}" for c in COLUMNS)]
    for target, label in labels.items():
        if target in notes:
            lines.append(f"{label:<{label_width}}  {notes[target]}")
            continue
        cells = summary.get(target, {})
        shown_cells = {c.key: _cell(cells.get(c.key), c.decimals) for c in COLUMNS}
        if cells.get("rss_capped"):  # fewer requests than planned: a note says how many
            shown_cells["rss_growth_pct"] += "*"
            shown_cells["rss_growth_warm_pct"] += "*"
        lines.append(
            f"{label:<{label_width}}" + "".join(f"{shown_cells[c.key]:>{width}}" for c in COLUMNS)
        )
    goal = "".join(
        f"{(c.target[0] + format(c.target[1], 'g')) if c.target else '—':>{width}}" for c in COLUMNS
    )
    lines.append(f"{'target (this proxy)':<{label_width}}{goal}")
    marks = verdicts(summary)
    shown = {"pass": "pass", "miss": "MISS", "invalid": "ERR", "not measured": "—"}
    mark_cells = "".join(
        f"{shown[marks[c.key]] if c.key in marks else '':>{width}}" for c in COLUMNS
    )
    lines.append(f"{'this proxy vs target':<{label_width}}{mark_cells}")
    return "\n".join(lines)
