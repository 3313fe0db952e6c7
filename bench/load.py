"""A closed-loop load run (N keep-alive connections, each sending its next request when the last
answer is in) and its result, whichever generator produced it.

Two generators implement it: `wrk` (bench/wrk.py), preferred when installed since it is C and
costs far less per request than anything it measures, and the Python one (bench/loadgen.py) for
machines without it. Both run as their own process on the client CPUs and hand back JSON, so
nothing is scraped from a human-readable report.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class LoadSpec:
    url: str
    method: str = "GET"
    body: bytes = b""
    connections: int = 1
    duration_s: float = 5.0


@dataclass
class LoadResult:
    generator: str
    connections: int
    duration_s: float
    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # responses that were not 2xx (wrk: >= 400) plus socket errors and timeouts
    error_detail: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "rps": self.rps}


class Generator(Protocol):
    name: str

    def run(self, spec: LoadSpec) -> LoadResult: ...


def wrk_version() -> str | None:
    """`wrk 4.1.0` style, or None when wrk is not on PATH."""
    path = shutil.which("wrk")
    if path is None:
        return None
    # wrk prints its version on -v together with the usage text, and exits 1
    done = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10, check=False)
    first = (done.stdout or done.stderr).splitlines()[:1]
    words = first[0].split() if first else []
    return " ".join(words[:2]) if words else "wrk"
