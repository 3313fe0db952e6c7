"""Reading the deployment files as their tools do: a Dockerfile as instructions, and the output of
`docker-compose config`, whose short and long forms (1.29 writes `"127.0.0.1:8100:8100/tcp"`,
v2 writes mappings) are brought to one shape."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, ARG, RUN...
    arguments: str


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """Comments dropped, continuation lines joined, as the builder reads them."""
    instructions: list[Instruction] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text:
            keyword, _, arguments = text.partition(" ")
            instructions.append(Instruction(keyword.upper(), arguments.strip()))
    return instructions


def build_arguments(instructions: list[Instruction]) -> dict[str, str]:
    """Each `ARG NAME=default` (the first default wins, as for the first stage's FROM)."""
    defaults: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            defaults.setdefault(name, " ".join(shlex.split(default)))
    return defaults


@dataclass(frozen=True)
class Port:
    host_ip: str
    published: int
    target: int


def ports(service: dict[str, Any]) -> list[Port]:
    found = []
    for item in service.get("ports", []):
        if isinstance(item, dict):
            found.append(Port(item.get("host_ip", ""), int(item["published"]), int(item["target"])))
        else:
            *host, published, target = str(item).split("/")[0].split(":")
            found.append(Port(host[0] if host else "", int(published), int(target)))
    return found


@dataclass(frozen=True)
class Mount:
    source: str  # a host path, or a named volume
    target: str
    read_only: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    found = []
    for item in service.get("volumes", []):
        if isinstance(item, dict):
            found.append(Mount(item["source"], item["target"], bool(item.get("read_only"))))
        else:
            source, target, *mode = str(item).split(":")
            found.append(Mount(source, target, "ro" in mode))
    return found


def mount_at(service: dict[str, Any], target: str) -> Mount:
    matches = [mount for mount in mounts(service) if mount.target == target]
    assert len(matches) == 1, f"expected one mount at {target}, found {mounts(service)}"
    return matches[0]


def environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.partition("=")[::2] for item in raw)
    return {key: "" if value is None else str(value) for key, value in raw.items()}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices: list[dict[str, Any]] = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return devices


_DURATION = re.compile(r"(?:(\d+)m)?(?:(\d+)s)?")


def seconds(duration: str) -> int:
    """A compose duration such as `90s` or `1m30s`."""
    match = _DURATION.fullmatch(duration)
    if match is None or not duration:
        raise ValueError(f"not a duration: {duration!r}")
    minutes, secs = (int(part) if part else 0 for part in match.groups())
    return minutes * 60 + secs
