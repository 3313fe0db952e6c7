"""Percentiles and medians, one definition for every part of the benchmark.

Nearest rank on sorted samples: a p99 is a latency that was really observed, never an
interpolation between two requests.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(ordered: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0 < q <= 100) of already sorted samples, by nearest rank."""
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def median_or_none(values: Sequence[float | None]) -> float | None:
    """The median of the values that exist (rounds that were skipped or failed give None)."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None
