"""`imageworks-loader` through its real console script, as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import entry, read_json, write_json

LOADER = Path(sys.executable).parent / "imageworks-loader"


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def run(
    *args: str, registry_dir: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "IMAGEWORKS_OLLAMA_HOST": _dead_url(), **env}
    prefix = ["--registry-dir", str(registry_dir)] if registry_dir else []
    return subprocess.run(
        [str(LOADER), *prefix, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    directory = tmp_path / "weights" / "llama"
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"arch": "llama"}')
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return directory


@pytest.fixture
def registry(registry_dir: Path, weights: Path) -> Path:
    write_json(
        registry_dir / "model_registry.curated.json",
        [
            entry(
                "llama_12.2b_(Q4_K_M)",
                backend="vllm",
                display_name="llama 12.2b (Q4 K M)",
                quantization="q4_k_m",
                download_path=str(weights),
                served_model_id="meta/llama-12b",
            ),
            entry("ghost_7b", backend="vllm", download_path=str(weights.parent / "missing")),
            entry("phi4_14b", backend="ollama", served_model_id="phi4:14b"),
        ],
    )
    return registry_dir


def test_list_prints_a_table_with_installed_and_locked_columns(registry: Path) -> None:
    result = run("list", registry_dir=registry)
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "DISPLAY", "NAME", "BACKEND", "QUANT", "INSTALLED", "LOCKED"]
    by_name = {row.split()[0]: row.split() for row in rows}
    assert by_name["llama_12.2b_(Q4_K_M)"][-2:] == ["yes", "no"]
    assert by_name["ghost_7b"][-2:] == ["no", "no"]
    assert by_name["phi4_14b"][-2:] == ["unknown", "no"]  # Ollama is not running


def test_list_json_with_filters(registry: Path) -> None:
    everything = json.loads(run("list", "--json", registry_dir=registry).stdout)
    assert [row["name"] for row in everything] == ["ghost_7b", "llama_12.2b_(Q4_K_M)", "phi4_14b"]
    assert everything[1] == {
        "name": "llama_12.2b_(Q4_K_M)",
        "display_name": "llama 12.2b (Q4 K M)",
        "backend": "vllm",
        "quantization": "q4_k_m",
        "installed": "yes",
        "locked": False,
    }
    installed = json.loads(run("list", "--json", "--installed", registry_dir=registry).stdout)
    assert [row["name"] for row in installed] == ["llama_12.2b_(Q4_K_M)"]
    ollama = json.loads(run("list", "--json", "--backend", "ollama", registry_dir=registry).stdout)
    assert [row["name"] for row in ollama] == ["phi4_14b"]


def test_list_writes_the_merged_registry_file(registry: Path) -> None:
    run("list", registry_dir=registry)
    merged = read_json(registry / "model_registry.json")
    assert [e["name"] for e in merged] == ["ghost_7b", "llama_12.2b_(Q4_K_M)", "phi4_14b"]


def test_list_warns_about_a_malformed_entry_and_lists_the_rest(registry: Path) -> None:
    write_json(registry / "model_registry.discovered.json", [{"name": "broken", "backend": 7}])
    result = run("list", "--json", registry_dir=registry)
    assert result.returncode == 0
    assert "model_registry.discovered.json" in result.stderr
    assert "'broken'" in result.stderr
    assert len(json.loads(result.stdout)) == 3


def test_corrupt_layer_is_one_line_naming_file_and_line(registry: Path) -> None:
    (registry / "model_registry.discovered.json").write_text('[\n{"name": "x",\n]\n')
    line = assert_one_line_error(run("list", registry_dir=registry))
    assert "model_registry.discovered.json:3:" in line
    assert "invalid JSON" in line


def test_show_resolves_any_spelling_of_a_name(registry: Path) -> None:
    for spelling in ("llama 12.2b (Q4 K M)", "LLAMA 12.2B (q4_k_m)", "meta/llama-12b"):
        result = run("show", spelling, "--json", registry_dir=registry)
        assert result.returncode == 0, result.stderr
        details = json.loads(result.stdout)
        assert details["name"] == "llama_12.2b_(Q4_K_M)"
        assert details["logical_slug"] == "llama_12.2b_(Q4_K_M)"
        assert details["entry"]["served_model_id"] == "meta/llama-12b"


def test_show_unknown_name_suggests_close_names(registry: Path) -> None:
    line = assert_one_line_error(run("show", "llama", registry_dir=registry))
    assert "no model named 'llama'" in line
    assert "llama 12.2b (Q4 K M)" in line


def test_show_ambiguous_name_lists_candidates(registry: Path, weights: Path) -> None:
    write_json(
        registry / "model_registry.discovered.json",
        [entry("llama_b", display_name="twin"), entry("llama_a", display_name="twin")],
    )
    line = assert_one_line_error(run("show", "twin", registry_dir=registry))
    assert "'llama_a'" in line
    assert "'llama_b'" in line


def test_lock_verify_detects_one_changed_byte(registry: Path, weights: Path) -> None:
    curated = (registry / "model_registry.curated.json").read_bytes()
    locked = run("lock", "llama 12.2b (Q4 K M)", registry_dir=registry)
    assert locked.returncode == 0, locked.stderr
    assert run("verify", registry_dir=registry).stdout.startswith("OK ")

    model = weights / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[1000] ^= 0x01
    model.write_bytes(bytes(data))

    changed = run("verify", registry_dir=registry)
    assert changed.returncode == 1
    assert changed.stdout.startswith("CHANGED ")
    assert "llama_12.2b_(Q4_K_M)" in changed.stderr
    assert (registry / "model_registry.curated.json").read_bytes() == curated


def test_unlock_stops_enforcing_the_lock(registry: Path, weights: Path) -> None:
    run("lock", "llama_12.2b_(Q4_K_M)", registry_dir=registry)
    (weights / "config.json").write_text('{"arch": "changed"}')
    assert run("unlock", "llama_12.2b_(Q4_K_M)", registry_dir=registry).returncode == 0

    result = run("verify", "llama_12.2b_(Q4_K_M)", registry_dir=registry)
    assert result.returncode == 0
    assert result.stdout.startswith("UNLOCKED ")
    row = json.loads(run("list", "--json", registry_dir=registry).stdout)[1]
    assert row["locked"] is False


def test_verify_without_weights_is_one_line_error(registry: Path) -> None:
    line = assert_one_line_error(run("verify", "phi4_14b", registry_dir=registry))
    assert "no local weights" in line


def test_bad_usage_exits_2(registry: Path) -> None:
    result = run("frobnicate", registry_dir=registry)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_bad_setting_names_the_variable(registry: Path) -> None:
    result = run("list", registry_dir=registry, IMAGEWORKS_INSTALLED_CHECK_TIMEOUT_S="soon")
    line = assert_one_line_error(result)
    assert "IMAGEWORKS_INSTALLED_CHECK_TIMEOUT_S" in line


def test_missing_registry_directory_is_one_line_error(tmp_path: Path) -> None:
    line = assert_one_line_error(run("list", registry_dir=tmp_path / "nowhere"))
    assert "no registry files" in line


def test_demo_registry_lists_both_demo_models_installed(demo_registry: Path) -> None:
    result = run("list", "--json", IMAGEWORKS_REGISTRY_DIR=str(demo_registry))
    assert result.returncode == 0, result.stderr
    installed = {row["name"]: row["installed"] for row in json.loads(result.stdout)}
    assert installed["smollm2_135m_(Q4_1)"] == "yes"
    assert installed["gemma3_270m_(Q4_K_M)"] == "yes"
    assert installed["qwen2.5-vl-7b-instruct_(AWQ)"] == "no"
    assert installed["qwen3_8b_(Q4_K_M)"] == "unknown"
