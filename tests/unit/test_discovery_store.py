"""`RegistryStore.rewrite_discovered`: discovery's one writer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from conftest import entry, read_json, write_json
from imageworks.registry.errors import RegistryError
from imageworks.registry.store import RegistryStore

NEW = entry("found", metadata={"discovered": {"source": "ollama", "tag": "found:latest"}})


def _adding(item: dict[str, Any]) -> Any:
    def rewrite(curated: Mapping[str, Any], items: list[Any]) -> list[Any]:
        return [*items, item]

    return rewrite


def test_it_writes_the_discovered_layer_and_the_merged_file(registry_dir: Path) -> None:
    write_json(registry_dir / "model_registry.curated.json", [entry("mine")])
    store = RegistryStore(registry_dir)
    assert store.rewrite_discovered(_adding(NEW)) is True
    assert read_json(store.discovered_path) == [NEW]
    assert [e["name"] for e in read_json(store.merged_path)] == ["found", "mine"]


def test_the_same_content_is_never_rewritten(registry_dir: Path) -> None:
    store = RegistryStore(registry_dir)
    write_json(store.discovered_path, [NEW])
    before = store.discovered_path.stat().st_mtime_ns
    assert store.rewrite_discovered(lambda curated, items: items) is False
    assert store.discovered_path.stat().st_mtime_ns == before


def test_a_dry_run_reports_the_change_and_writes_nothing(registry_dir: Path) -> None:
    store = RegistryStore(registry_dir)
    write_json(store.curated_path, [entry("mine")])
    assert store.rewrite_discovered(_adding(NEW), dry_run=True) is True
    assert not store.discovered_path.exists()
    assert not store.merged_path.exists()


def test_a_fresh_directory_gets_a_discovered_layer_but_nothing_when_nothing_was_found(
    registry_dir: Path,
) -> None:
    store = RegistryStore(registry_dir)
    assert store.rewrite_discovered(lambda curated, items: items) is False
    assert not store.discovered_path.exists()
    assert store.rewrite_discovered(_adding(NEW)) is True
    assert read_json(store.discovered_path) == [NEW]


def test_a_single_file_registry_is_rewritten_in_place(registry_dir: Path) -> None:
    store = RegistryStore(registry_dir)
    write_json(store.merged_path, [entry("old")])
    seen: list[list[Any]] = []

    def rewrite(curated: Mapping[str, Any], items: list[Any]) -> list[Any]:
        assert curated == {}
        seen.append(items)
        return [*items, NEW]

    assert store.rewrite_discovered(rewrite) is True
    assert seen == [[entry("old")]]
    assert [e["name"] for e in read_json(store.merged_path)] == ["old", "found"]
    assert not store.discovered_path.exists()


def test_an_entry_the_rewrite_made_invalid_is_refused_and_nothing_written(
    registry_dir: Path,
) -> None:
    store = RegistryStore(registry_dir)
    write_json(store.curated_path, [entry("found", backend_config={"port": 1})])
    broken = {**NEW, "backend_config": {"context_length": -5}}
    with pytest.raises(RegistryError, match="'found' invalid"):
        store.rewrite_discovered(_adding(broken))
    assert not store.discovered_path.exists()
