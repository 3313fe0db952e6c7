"""Registries for the proxy under test: the one entry that points at the bench upstream, and
filler entries to make a listing of realistic size.

Clients ask for `bench echo` (a display name), the upstream serves `echo`, as in a real
deployment where names differ. Filler entries are external too, on the same upstream URL under
ids it does not serve, so they are listed (CHAT_PROXY_INCLUDE_NON_INSTALLED=1) but never used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL = "bench echo"
CURATED = "model_registry.curated.json"


def echo_entry(upstream_url: str) -> dict[str, Any]:
    return {
        "name": "bench_echo",
        "display_name": MODEL,
        "backend": "external",
        "served_model_id": "echo",
        "backend_config": {"base_url": f"{upstream_url}/v1"},
    }


def filler_entries(count: int, upstream_url: str) -> list[dict[str, Any]]:
    return [
        {
            "name": f"bench_filler_{number:03d}",
            "display_name": f"bench filler {number:03d}",
            "backend": "external",
            "served_model_id": f"filler-{number:03d}",
            "backend_config": {"base_url": f"{upstream_url}/v1"},
        }
        for number in range(1, count + 1)
    ]


def write_registry(directory: Path, entries: list[dict[str, Any]]) -> Path:
    """`directory/model_registry.curated.json` with `entries`; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CURATED).write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    return directory


def add_entries(directory: Path, entries: list[dict[str, Any]]) -> None:
    """Append `entries` to the curated registry already in `directory` (the demo's)."""
    path = directory / CURATED
    existing: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    write_registry(directory, existing + entries)
