"""What the numbers were measured on, and which CPU each process ran on.

Latencies of a fraction of a millisecond only mean something beside the machine that produced
them: the CPU model, how many cores the run could use, memory, kernel, Python, the load
generator, where each process was pinned, the load average before the run (other work on the
same cores shows up directly), and when.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Placement:
    """CPU sets: the measured server alone on its own, clients (upstream, load generator,
    streaming client, this harness) on the rest. With one CPU nothing can be separated."""

    server: frozenset[int]
    upstream: frozenset[int]
    client: frozenset[int]
    all: frozenset[int]

    @classmethod
    def for_cpus(cls, cpus: frozenset[int]) -> Placement:
        ordered = sorted(cpus)
        if len(ordered) == 1:
            one = frozenset(ordered)
            return cls(one, one, one, one)
        if len(ordered) == 2:  # server on the second; upstream and clients share the first
            return cls(frozenset(ordered[1:]), frozenset(ordered[:1]), frozenset(ordered[:1]), cpus)
        # three or more: harness and load generator on the first, server and upstream alone
        return cls(frozenset(ordered[1:2]), frozenset(ordered[2:3]), frozenset(ordered[:1]), cpus)

    def describe(self) -> dict[str, str]:
        def cpus(group: frozenset[int]) -> str:
            return ",".join(str(cpu) for cpu in sorted(group))

        return {
            "measured server (proxy, floor, LiteLLM, nginx)": f"CPU {cpus(self.server)}",
            "upstream": f"CPU {cpus(self.upstream)}",
            "load generator, streaming client, harness": f"CPU {cpus(self.client)}",
            "swap phase (demo proxy and llama-server)": f"CPU {cpus(self.all)} (not pinned: "
            "a model server confined to one core would measure the pinning, not the swap)",
        }


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cores_online: int
    cores_usable: int
    memory_gib: float
    kernel: str
    os: str
    python: str
    load_generator: str
    placement: dict[str, str]
    load_average_before: str
    date_utc: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"machine: {self.cpu_model}, {self.cores_usable} of {self.cores_online} cores "
            f"usable, {self.memory_gib:.1f} GiB RAM, Linux {self.kernel}, {self.os}",
            f"python {self.python}; load generator: {self.load_generator}",
            "placement: " + "; ".join(f"{who}: {where}" for who, where in self.placement.items()),
            f"load average before the run: {self.load_average_before}; date: {self.date_utc}",
        ]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def describe(load_generator: str, placement: Placement) -> Machine:
    return Machine(
        cpu_model=cpu_model(),
        cores_online=os.cpu_count() or 0,
        cores_usable=len(placement.all),
        memory_gib=memory_gib(),
        kernel=platform.release(),
        os=os_release(),
        python=platform.python_version(),
        load_generator=load_generator,
        placement=placement.describe(),
        load_average_before=load_average(),
        date_utc=datetime.now(UTC).isoformat(timespec="seconds"),
    )
