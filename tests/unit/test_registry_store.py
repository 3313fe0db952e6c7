from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from conftest import FIXTURES, entry, read_json, write_json
from imageworks.registry.errors import EntryNotFound, RegistryError
from imageworks.registry.store import RegistryStore

ORIGINAL = FIXTURES / "original_registry.json"


def _store_with(
    directory: Path, curated: list[object] | None = None, discovered: list[object] | None = None
) -> RegistryStore:
    if curated is not None:
        write_json(directory / "model_registry.curated.json", curated)
    if discovered is not None:
        write_json(directory / "model_registry.discovered.json", discovered)
    return RegistryStore(directory)


def test_original_registry_file_loads_unchanged_as_single_file(registry_dir: Path) -> None:
    shutil.copy(ORIGINAL, registry_dir / "model_registry.json")
    snapshot = RegistryStore(registry_dir).load()

    assert [e.name for e in snapshot.entries] == sorted(e["name"] for e in read_json(ORIGINAL))
    assert snapshot.warnings == ()
    mistral = snapshot.get("mistral-small-24b-instruct_(AWQ)")
    assert mistral is not None
    assert mistral.backend_config.port == 24001
    assert mistral.backend_config.extra_args == ["--max-model-len", "8192", "--enforce-eager"]
    assert mistral.version_lock.locked is True
    assert mistral.generation_defaults.stop_sequences == ["</s>"]
    assert mistral.capability("tools") is True
    assert mistral.capability("vision") is False
    qwen = snapshot.get("qwen2.5vl_7b_(Q4_K_M)")
    assert qwen is not None
    assert qwen.capability("vision") is True  # `vl`/`multimodal` are vision
    assert qwen.served_id is None  # the literal "None" the original wrote means absent
    assert qwen.deprecated is True


def test_original_registry_round_trips_field_for_field(registry_dir: Path) -> None:
    shutil.copy(ORIGINAL, registry_dir / "model_registry.json")
    snapshot = RegistryStore(registry_dir).load()
    original = {e["name"]: e for e in read_json(ORIGINAL)}
    for parsed in snapshot.entries:
        assert parsed.to_json() == original[parsed.name]
        assert snapshot.raw[parsed.name] == original[parsed.name]


def test_original_entries_as_curated_layer_regenerate_identical_merged_file(
    registry_dir: Path,
) -> None:
    store = _store_with(registry_dir, curated=read_json(ORIGINAL))
    assert store.refresh_merged_file() is True
    merged = read_json(registry_dir / "model_registry.json")
    assert merged == sorted(read_json(ORIGINAL), key=lambda e: e["name"])
    assert store.refresh_merged_file() is False  # already up to date: not rewritten


def test_layered_merge_curated_wins_field_by_field(registry_dir: Path) -> None:
    store = _store_with(
        registry_dir,
        curated=[
            entry("both", backend_config={"port": 9000}, roles=["chat"], download_path=None),
            entry("curated-only"),
        ],
        discovered=[
            entry(
                "both",
                backend="vllm",
                backend_config={"port": 1, "model_path": "/w"},
                roles=["caption", "chat"],
                download_path="/w",
            ),
            entry("discovered-only", backend="ollama"),
        ],
    )
    snapshot = store.load()
    assert [e.name for e in snapshot.entries] == ["both", "curated-only", "discovered-only"]
    both = snapshot.get("both")
    assert both is not None
    assert both.backend == "llamacpp"  # curated scalar wins
    assert both.backend_config.port == 9000  # curated leaf wins inside a dict ...
    assert both.backend_config.model_path == "/w"  # ... and discovered leaves stay
    assert both.roles == ["chat"]  # lists replace
    assert both.download_path == "/w"  # curated null does not erase
    assert snapshot.sources["both"] == (
        registry_dir / "model_registry.curated.json",
        registry_dir / "model_registry.discovered.json",
    )


def test_malformed_entry_is_skipped_with_warning_and_others_served(registry_dir: Path) -> None:
    store = _store_with(
        registry_dir,
        curated=[
            entry("good"),
            {"name": "no-backend"},
            entry("bad-port", backend_config={"port": "abc"}),
        ],
    )
    snapshot = store.load()
    assert [e.name for e in snapshot.entries] == ["good"]
    assert len(snapshot.warnings) == 2
    curated = str(registry_dir / "model_registry.curated.json")
    assert any(curated in w and "'no-backend'" in w and "backend" in w for w in snapshot.warnings)
    assert any(curated in w and "'bad-port'" in w and "port" in w for w in snapshot.warnings)


def test_corrupt_layer_is_an_error_naming_file_and_line(registry_dir: Path) -> None:
    path = registry_dir / "model_registry.discovered.json"
    path.write_text('[\n  {"name": "a", "backend": "vllm"},\n  {"name": "b",, }\n]\n')
    with pytest.raises(RegistryError, match=rf"^{path}:3:\d+: invalid JSON"):
        RegistryStore(registry_dir).load()


def test_layer_that_is_not_a_list_is_an_error(registry_dir: Path) -> None:
    write_json(registry_dir / "model_registry.curated.json", {"name": "a"})
    with pytest.raises(RegistryError, match="must hold a JSON list"):
        RegistryStore(registry_dir).load()


def test_empty_directory_is_an_error_naming_expected_files(registry_dir: Path) -> None:
    with pytest.raises(RegistryError, match=r"model_registry\.curated\.json"):
        RegistryStore(registry_dir).load()


def test_load_is_cached_until_a_layer_changes(registry_dir: Path) -> None:
    store = _store_with(registry_dir, curated=[entry("a")])
    first = store.load()
    assert store.load() is first

    write_json(registry_dir / "model_registry.discovered.json", [entry("b")])
    second = store.load()
    assert [e.name for e in second.entries] == ["a", "b"]


def test_reload_notices_same_size_rewrite(registry_dir: Path) -> None:
    store = _store_with(registry_dir, curated=[entry("aaaa")])
    store.load()
    path = registry_dir / "model_registry.curated.json"
    stat = path.stat()
    write_json(path, [entry("bbbb")])  # same size; make sure the mtime differs too
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert [e.name for e in store.load().entries] == ["bbbb"]


def test_loading_writes_nothing(registry_dir: Path) -> None:
    _store_with(registry_dir, curated=[entry("a")]).load()
    assert sorted(p.name for p in registry_dir.iterdir()) == ["model_registry.curated.json"]


def test_update_goes_to_discovered_and_never_rewrites_curated(registry_dir: Path) -> None:
    store = _store_with(registry_dir, curated=[entry("a", metadata={"keep": 1})])
    curated_bytes = (registry_dir / "model_registry.curated.json").read_bytes()

    updated = store.update_entry("a", {"version_lock": {"locked": True}})

    assert updated.version_lock.locked is True
    assert (registry_dir / "model_registry.curated.json").read_bytes() == curated_bytes
    assert read_json(registry_dir / "model_registry.discovered.json") == [
        {"name": "a", "version_lock": {"locked": True}}
    ]
    merged = read_json(registry_dir / "model_registry.json")
    assert merged == [
        {
            "name": "a",
            "backend": "llamacpp",
            "metadata": {"keep": 1},
            "version_lock": {"locked": True},
        }
    ]
    assert store.load().get("a").version_lock.locked is True  # type: ignore[union-attr]


def test_update_refused_when_curated_layer_sets_the_field(registry_dir: Path) -> None:
    store = _store_with(registry_dir, curated=[entry("a", version_lock={"locked": False})])
    with pytest.raises(RegistryError, match=r"curated.*version_lock\.locked.*change it there"):
        store.update_entry("a", {"version_lock": {"locked": True}})
    assert not (registry_dir / "model_registry.discovered.json").exists()


def test_update_unknown_entry_is_not_found(registry_dir: Path) -> None:
    store = _store_with(registry_dir, curated=[entry("a")])
    with pytest.raises(EntryNotFound):
        store.update_entry("nope", {"deprecated": True})


def test_update_in_single_file_mode_rewrites_that_file(registry_dir: Path) -> None:
    write_json(registry_dir / "model_registry.json", [entry("a"), entry("b")])
    store = RegistryStore(registry_dir)
    store.update_entry("b", {"deprecated": True})
    assert read_json(registry_dir / "model_registry.json") == [
        entry("a"),
        entry("b", deprecated=True),
    ]
    assert not (registry_dir / "model_registry.discovered.json").exists()


def test_writes_are_atomic_leaving_no_temporary_files(registry_dir: Path) -> None:
    store = _store_with(registry_dir, curated=[entry("a")])
    store.update_entry("a", {"metadata": {"x": 1}})
    leftovers = [p.name for p in registry_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def _add_keys(directory: str, prefix: str, count: int) -> None:
    store = RegistryStore(Path(directory))
    for i in range(count):
        store.update_entry("shared", {"metadata": {f"{prefix}{i}": i}})


def test_concurrent_writers_in_two_processes_lose_no_update(registry_dir: Path) -> None:
    _store_with(registry_dir, curated=[entry("shared")])
    count = 40
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_add_keys, args=(str(registry_dir), prefix, count))
        for prefix in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0

    metadata = RegistryStore(registry_dir).load().get("shared").metadata  # type: ignore[union-attr]
    expected = {f"{p}{i}" for p in ("a", "b") for i in range(count)}
    assert set(metadata) == expected
    merged = read_json(registry_dir / "model_registry.json")
    assert set(merged[0]["metadata"]) == expected
    json.loads((registry_dir / "model_registry.discovered.json").read_text())  # still valid JSON
