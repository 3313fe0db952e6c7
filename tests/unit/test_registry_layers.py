from __future__ import annotations

from imageworks.registry.layers import apply_patch, index_by_name, merge_layers, overlay


def test_overlay_curated_scalar_wins() -> None:
    assert overlay({"quantization": "awq"}, {"quantization": "fp8"}) == {"quantization": "fp8"}


def test_overlay_dicts_merge_deeply() -> None:
    base = {"backend_config": {"port": 1, "extra_args": ["--a"], "nested": {"x": 1, "y": 2}}}
    top = {"backend_config": {"port": 2, "nested": {"y": 3}}}
    assert overlay(base, top) == {
        "backend_config": {"port": 2, "extra_args": ["--a"], "nested": {"x": 1, "y": 3}}
    }


def test_overlay_lists_replace_not_concatenate() -> None:
    assert overlay({"roles": ["a", "b"]}, {"roles": ["c"]}) == {"roles": ["c"]}


def test_overlay_null_in_curated_keeps_discovered_value() -> None:
    assert overlay({"download_path": "/w"}, {"download_path": None}) == {"download_path": "/w"}


def test_overlay_leaves_inputs_untouched() -> None:
    base = {"metadata": {"a": 1}}
    top = {"metadata": {"b": 2}}
    overlay(base, top)
    assert base == {"metadata": {"a": 1}}
    assert top == {"metadata": {"b": 2}}


def test_apply_patch_explicit_none_sets_null() -> None:
    assert apply_patch({"version_lock": {"locked": True}}, {"version_lock": {"locked": None}}) == {
        "version_lock": {"locked": None}
    }


def test_merge_layers_keeps_names_from_either_layer_in_name_order() -> None:
    curated = {"b": {"name": "b", "backend": "vllm"}, "c": {"name": "c", "backend": "vllm"}}
    discovered = {"a": {"name": "a", "backend": "ollama"}, "b": {"name": "b", "family": "x"}}
    merged = merge_layers(curated, discovered)
    assert list(merged) == ["a", "b", "c"]
    assert merged["b"] == {"name": "b", "family": "x", "backend": "vllm"}


def test_index_by_name_skips_unkeyable_items_with_warnings_naming_file() -> None:
    warnings: list[str] = []
    items = [{"name": "ok"}, "junk", {"backend": "vllm"}, {"name": "ok", "backend": "x"}]
    indexed = index_by_name(items, "layer.json", warnings)
    assert indexed == {"ok": {"name": "ok"}}
    assert len(warnings) == 3
    assert all(w.startswith("layer.json: ") for w in warnings)
    assert "entry #2" in warnings[0]
    assert "'ok'" in warnings[2]
