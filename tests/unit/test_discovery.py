"""The discovered layer after a discovery run: the pure rules of registry/discovery.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from imageworks.registry.discovered_entries import (
    OLLAMA,
    WEIGHTS,
    Found,
    from_ollama,
    ollama_stem,
    parameter_label,
)
from imageworks.registry.discovery import Plan, Scanned, plan
from imageworks.registry.ollama_tags import OllamaModel

TODAY = "2026-12-02"


def gguf(path: Path, stem: str = "tiny-llama-1b", quant: str = "q4_k_m", **extra: Any) -> Found:
    fields = {
        "backend": "llamacpp",
        "quantization": quant,
        "download_path": str(path),
        "backend_config": {"model_path": str(path)},
        "capabilities": {"text": True},
        "chat_template": {"source": "embedded"},
        "metadata": {"discovered": {"source": WEIGHTS, "path": str(path), **extra}},
    }
    return Found(WEIGHTS, str(path), stem, None, fields)


def ollama(tag: str = "qwen3:8b", quantization: str = "Q4_K_M") -> Found:
    model = OllamaModel(tag, "qwen3", "8.2B", quantization, "gguf", 5, "abc", None, None)
    return from_ollama(model)


def run(
    found: list[Found],
    items: list[Any],
    tmp_path: Path,
    *,
    curated: dict[str, Any] | None = None,
    ollama_up: bool = True,
    root: Path | None = None,
) -> Plan:
    scanned = Scanned(root or tmp_path, ollama_up)
    return plan(found, scanned, curated or {}, items, registry_dir=tmp_path, today=TODAY)


def test_new_models_get_names_from_the_naming_rules(tmp_path: Path) -> None:
    result = run([gguf(tmp_path / "a.gguf"), ollama()], [], tmp_path)
    names = [(item["name"], item["display_name"]) for item in result.items]
    assert names == [
        ("tiny-llama-1b_(Q4_K_M)", "tiny-llama-1b (Q4 K M)"),
        ("qwen3_8.2b_(Q4_K_M)", "qwen3 8.2b (Q4 K M)"),
    ]
    qwen = result.items[1]
    assert qwen["backend"] == "ollama"
    assert qwen["served_model_id"] == "qwen3:8b"
    assert "host" not in qwen.get("backend_config", {})  # IMAGEWORKS_OLLAMA_HOST decides
    assert [change.name for change in result.added] == [item["name"] for item in result.items]


def test_a_second_run_over_the_same_things_changes_nothing(tmp_path: Path) -> None:
    found = [gguf(tmp_path / "a.gguf"), ollama()]
    first = run(found, [], tmp_path)
    second = run(found, copy.deepcopy(first.items), tmp_path)
    assert second.items == first.items
    assert not second.changed
    assert sorted(second.unchanged) == sorted(item["name"] for item in first.items)


def test_a_model_found_again_is_updated_in_place_keeping_other_tools_fields(
    tmp_path: Path,
) -> None:
    [entry] = run([gguf(tmp_path / "a.gguf")], [], tmp_path).items
    entry["version_lock"] = {"locked": True, "expected_aggregate_sha256": "0" * 64}
    entry["backend_config"]["extra_args"] = ["--mlock"]
    replaced = gguf(tmp_path / "a.gguf", stem="renamed", quant="q8_0", parameters=7)
    result = run([replaced], [entry], tmp_path)
    [updated] = result.items
    assert updated["name"] == entry["name"]  # what registry tools refer to: kept
    assert updated["display_name"] == "renamed (Q8 0)"  # what clients see: follows the model
    assert updated["quantization"] == "q8_0"
    assert updated["version_lock"] == entry["version_lock"]
    assert updated["backend_config"]["extra_args"] == ["--mlock"]
    [change] = result.updated
    assert change.fields == ["display_name", "metadata.discovered.parameters", "quantization"]


def test_a_vanished_file_is_marked_then_unmarked_when_it_returns(tmp_path: Path) -> None:
    found = [gguf(tmp_path / "a.gguf")]
    items = run(found, [], tmp_path).items
    gone = run([], items, tmp_path)
    [entry] = gone.items
    assert entry["metadata"]["discovered"]["missing"] is True
    assert entry["metadata"]["discovered"]["missing_since"] == TODAY
    assert [change.name for change in gone.missing] == [entry["name"]]
    still = run([], gone.items, tmp_path)
    assert not still.changed
    assert still.still_missing == [entry["name"]]
    back = run(found, still.items, tmp_path)
    assert back.items == items
    assert [change.name for change in back.restored] == [entry["name"]]


def test_an_unanswering_ollama_marks_none_of_its_entries(tmp_path: Path) -> None:
    items = run([ollama()], [], tmp_path).items
    result = run([], items, tmp_path, ollama_up=False)
    assert result.items == items
    assert not result.changed


def test_entries_outside_the_scanned_weights_directory_are_left_alone(tmp_path: Path) -> None:
    items = run([gguf(tmp_path / "old" / "a.gguf")], [], tmp_path).items
    result = run([], items, tmp_path, root=tmp_path / "new")
    assert result.items == items


def test_a_model_a_curated_entry_points_at_is_not_added_again(tmp_path: Path) -> None:
    real = tmp_path / "models" / "a.gguf"
    real.parent.mkdir()
    real.write_bytes(b"GGUF")
    link = tmp_path / "weights" / "a.gguf"
    link.parent.mkdir()
    link.symlink_to(real)
    curated = {
        "mine": {"name": "mine", "backend": "llamacpp", "download_path": "models/a.gguf"},
        "qwen": {"name": "qwen", "backend": "ollama", "served_model_id": "qwen3:8b"},
    }
    result = run([gguf(link), ollama()], [], tmp_path, curated=curated)
    assert result.items == []
    assert result.curated == [(str(link), "mine"), ("qwen3:8b", "qwen")]


def test_an_own_entry_is_removed_once_curated_unless_other_tools_wrote_on_it(
    tmp_path: Path,
) -> None:
    items = run([ollama(), ollama("llava:7b")], [], tmp_path).items
    items[1]["version_lock"] = {"locked": True}
    curated = {
        "a": {"name": "a", "backend": "ollama", "served_model_id": "QWEN3:8B"},
        "b": {"name": "b", "backend": "ollama", "served_model_id": "llava:7b"},
    }
    result = run([ollama(), ollama("llava:7b")], items, tmp_path, curated=curated)
    assert [change.name for change in result.removed] == [items[0]["name"]]
    assert result.items == [items[1]]
    assert any("version_lock" in warning for warning in result.warnings)


def test_other_tools_entries_are_never_changed_and_their_names_never_reused(
    tmp_path: Path,
) -> None:
    theirs = {"name": "tiny-llama-1b_(Q4_K_M)", "backend": "vllm", "download_path": "/elsewhere"}
    result = run([gguf(tmp_path / "a.gguf")], [theirs], tmp_path)
    assert result.items[0] == theirs
    assert result.items[1]["name"] == "tiny-llama-1b_(Q4_K_M)_[a.gguf]"
    assert result.items[1]["display_name"] == "tiny-llama-1b (Q4 K M) [a.gguf]"
    again = run([gguf(tmp_path / "a.gguf")], result.items, tmp_path)
    assert not again.changed  # the bracketed name stays: the plain one is still taken


def test_a_curated_entry_of_the_same_name_pointing_elsewhere_is_not_merged_into(
    tmp_path: Path,
) -> None:
    curated = {"qwen3_8.2b_(Q4_K_M)": {"name": "qwen3_8.2b_(Q4_K_M)", "backend": "vllm"}}
    result = run([ollama()], [], tmp_path, curated=curated)
    assert result.items[0]["name"] == "qwen3_8.2b_(Q4_K_M)_[qwen3:8b]"


def test_fields_no_longer_found_are_removed_without_empty_sections(tmp_path: Path) -> None:
    found = gguf(tmp_path / "a.gguf")
    [entry] = run([found], [], tmp_path).items
    no_template = Found(found.source, found.key, found.stem, None, {**found.fields})
    del no_template.fields["chat_template"]
    [updated] = run([no_template], [entry], tmp_path).items
    assert "chat_template" not in updated


def test_ollama_capabilities_become_the_entry_capabilities(tmp_path: Path) -> None:
    model = OllamaModel(
        "llava:7b", "llama", "7B", "Q4_0", "gguf", 1, None, ("completion", "vision"), 4096
    )
    found = from_ollama(model)
    assert found.fields["capabilities"] == {
        "text": True,
        "vision": True,
        "tools": False,
        "thinking": False,
        "embedding": False,
    }
    assert found.fields["generation_defaults"] == {"context_window": 4096}
    assert found.source == OLLAMA


@pytest.mark.parametrize(
    ("tag", "quant", "stem"),
    [
        ("qwen3:8b", "q4_k_m", "qwen3"),
        ("qwen3:latest", "q4_k_m", "qwen3"),
        ("mistral:instruct", "q4_0", "mistral-instruct"),
        ("qwen3:8b-q8_0", "q8_0", "qwen3"),
        ("llama3.1:8b-instruct-q4_K_M", "q4_k_m", "llama3.1-instruct"),
        (
            "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
            "q4_k_m",
            "Llama-3.2-1B-Instruct-GGUF",
        ),
    ],
)
def test_ollama_stem_keeps_what_the_tag_adds_beyond_size_and_quant(
    tag: str, quant: str, stem: str
) -> None:
    assert ollama_stem(tag, quant) == stem


@pytest.mark.parametrize(
    ("count", "label"),
    [(7_615_616_512, "7.6b"), (12_000_000_000, "12b"), (134_515_008, "135m"), (0, None)],
)
def test_parameter_label(count: int, label: str | None) -> None:
    assert parameter_label(count) == label
