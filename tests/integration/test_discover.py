"""`imageworks-loader discover` through its real console script: a weights directory holding the
real demo GGUF and small Hugging Face folders, the fake Ollama, and a running proxy that picks the
discovered layer up by itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import entry, read_json, write_json
from support.fake_ollama import FakeOllama, dead_url
from support.proxy_process import SOURCE, Workspace
from support.weights import SMOLLM2, hf_folder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LOADER = Path(sys.executable).parent / "imageworks-loader"
SMOL = "smollm2-135m-instruct_(Q4_1)"  # from the file's name (see discovered_entries.py)
SMOL_SHOWN = "smollm2-135m-instruct (Q4 1)"
VL = "qwen2-vl-2b-instruct_(AWQ)"
TEXT = "tiny-chat_1k"  # 1,280 parameters in its tiny safetensors
QWEN, LLAVA = "qwen3:8b", "llava:7b"
GEMMA_CURATED = "gemma3_270m_(Q4_K_M)"


def run(registry: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("CHAT_PROXY_", "IMAGEWORKS_"))
    }
    environment = {**inherited, "PYTHONPATH": str(SOURCE), "IMAGEWORKS_OLLAMA_HOST": dead_url()}
    return subprocess.run(
        [str(LOADER), "--registry-dir", str(registry), "discover", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**environment, **env},
        check=False,
    )


def discover(registry: Path, *args: str, **env: str) -> dict[str, Any]:
    result = run(registry, *args, "--json", **env)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def files_state(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {
        path.name: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(directory.iterdir())
        if path.is_file() and not path.name.startswith(".")
    }


@pytest.fixture
def weights(tmp_path: Path, demo_models: Path) -> Path:
    root = tmp_path / "weights"
    (root / "gguf").mkdir(parents=True)
    (root / "gguf" / SMOLLM2).symlink_to(demo_models / SMOLLM2)
    vision = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vision_config": {"depth": 2},
        "quantization_config": {"quant_method": "awq", "bits": 4},
    }
    hf_folder(root / "hf" / "Qwen2-VL-2B-Instruct-AWQ", vision, processor=True)
    text = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    hf_folder(root / "hf" / "tiny-chat", text, template=False)
    return root


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    configs = tmp_path / "configs"
    write_json(
        configs / "model_registry.curated.json",
        [entry("curated-qwen", backend="ollama", served_model_id=QWEN)],
    )
    return configs


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(installed=[QWEN, LLAVA]) as server:
        yield server


def by_name(registry: Path) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in read_json(registry / "model_registry.discovered.json")}


def test_discover_records_ggufs_hf_folders_and_ollama_models(
    registry: Path, weights: Path, ollama: FakeOllama
) -> None:
    document = discover(registry, "--weights-dir", str(weights), "--ollama-host", ollama.url)
    assert document["written"] is True
    assert sorted(change["name"] for change in document["added"]) == sorted(
        [SMOL, VL, TEXT, "llava_8b_(Q4_K_M)"]
    )
    assert document["curated"] == [{"found": QWEN, "as": "curated-qwen"}]
    assert document["sources"]["weights"]["models"] == 3
    assert document["sources"]["ollama"] == {"host": ollama.url, "scanned": True, "models": 2}
    assert [w for w in document["warnings"] if "no chat template" in w] == [
        f"{weights / 'hf' / 'tiny-chat'}: no chat template: the proxy refuses chat requests for "
        "it until one is set (chat_template.name or chat_template.path in the curated layer)"
    ]

    entries = by_name(registry)
    smol = entries[SMOL]
    path = str(weights / "gguf" / SMOLLM2)
    assert smol["display_name"] == SMOL_SHOWN
    assert (smol["backend"], smol["quantization"], smol["family"]) == ("llamacpp", "q4_1", "llama")
    assert smol["backend_config"] == {"model_path": path}
    assert smol["chat_template"] == {"source": "embedded"}
    assert smol["generation_defaults"] == {"context_window": 8192}  # not the server's ctx-size
    assert smol["metadata"]["discovered"]["source"] == "weights"
    assert smol["metadata"]["discovered"]["parameters"] > 100_000_000

    vl = entries[VL]
    assert (vl["backend"], vl["quantization"], vl["download_format"]) == (
        "vllm",
        "awq",
        "safetensors",
    )
    assert vl["capabilities"]["vision"] is True
    assert vl["chat_template"] == {"source": "embedded"}
    assert "chat_template" not in entries[TEXT]

    llava = entries["llava_8b_(Q4_K_M)"]
    assert (llava["backend"], llava["served_model_id"]) == ("ollama", LLAVA)
    assert "backend_config" not in llava  # no host: IMAGEWORKS_OLLAMA_HOST decides
    assert llava["capabilities"]["vision"] is True  # from /api/show
    assert llava["generation_defaults"] == {"context_window": 32768}

    merged = {e["name"] for e in read_json(registry / "model_registry.json")}
    assert merged == {"curated-qwen", SMOL, VL, TEXT, "llava_8b_(Q4_K_M)"}
    listed = subprocess.run(
        [str(LOADER), "--registry-dir", str(registry), "show", SMOL_SHOWN],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SOURCE), "IMAGEWORKS_OLLAMA_HOST": ollama.url},
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr


def test_dry_run_prints_the_changes_and_writes_nothing(registry: Path, weights: Path) -> None:
    before = files_state(registry)
    result = run(registry, "--weights-dir", str(weights), "--no-ollama", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert files_state(registry) == before
    lines = result.stdout.splitlines()
    assert lines[0] == f"Scanned {weights} (3 models)."
    assert "note: Ollama not asked (--no-ollama)" in lines
    assert any(line.startswith("added") and SMOL_SHOWN in line for line in lines)
    assert lines[-1].startswith("Dry run: ")
    assert lines[-1].endswith("would change; nothing written.")

    document = discover(registry, "--weights-dir", str(weights), "--no-ollama", "--dry-run")
    assert (document["changed"], document["written"]) == (True, False)
    assert files_state(registry) == before


def test_a_second_run_is_a_no_op(registry: Path, weights: Path, ollama: FakeOllama) -> None:
    args = ("--weights-dir", str(weights), "--ollama-host", ollama.url)
    discover(registry, *args)
    before = files_state(registry)
    again = run(registry, *args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-2:] == ["unchanged: 4", "Nothing changed; nothing written."]
    assert files_state(registry) == before


def test_a_vanished_file_is_marked_missing_then_unmarked(registry: Path, weights: Path) -> None:
    args = ("--weights-dir", str(weights), "--no-ollama")
    discover(registry, *args)
    moved = weights.parent / "aside"
    shutil.move(weights / "hf" / "tiny-chat", moved)

    gone = discover(registry, *args)
    assert [change["name"] for change in gone["missing"]] == [TEXT]
    marker = by_name(registry)[TEXT]["metadata"]["discovered"]
    assert marker["missing"] is True
    assert marker["missing_since"] == gone["missing"][0]["since"]
    assert TEXT not in {row["name"] for row in _installed(registry)}

    shutil.move(moved, weights / "hf" / "tiny-chat")
    back = discover(registry, *args)
    assert [change["name"] for change in back["restored"]] == [TEXT]
    assert "missing" not in by_name(registry)[TEXT]["metadata"]["discovered"]


def _installed(registry: Path) -> list[dict[str, Any]]:
    listed = subprocess.run(
        [str(LOADER), "--registry-dir", str(registry), "list", "--installed", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SOURCE), "IMAGEWORKS_OLLAMA_HOST": dead_url()},
        timeout=60,
        check=True,
    )
    rows: list[dict[str, Any]] = json.loads(listed.stdout)
    return rows


def test_an_unreachable_ollama_is_a_warning_and_marks_nothing(
    registry: Path, ollama: FakeOllama
) -> None:
    discover(registry, "--ollama-host", ollama.url)
    before = files_state(registry)
    result = run(registry, "--ollama-host", dead_url(), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["missing"] == []
    assert document["sources"]["ollama"]["scanned"] is False
    assert any("Ollama unreachable" in w for w in document["warnings"])
    assert "imageworks-loader: warning: Ollama unreachable" in result.stderr
    assert "no weights directory" in " ".join(document["notes"])
    assert files_state(registry) == before


def test_curated_entries_win_over_what_discovery_finds(
    tmp_path: Path, demo_registry: Path, weights: Path, ollama: FakeOllama
) -> None:
    """The demo registry curates SmolLM2 (by another path, a symlink to the same file) and
    qwen3:8b: neither is added again; a version lock on a discovered entry survives a rerun."""
    args = ("--weights-dir", str(weights), "--ollama-host", ollama.url)
    document = discover(demo_registry, *args)
    assert sorted(document["curated"], key=lambda c: c["as"]) == [
        {"found": QWEN, "as": "qwen3_8b_(Q4_K_M)"},
        {"found": str(weights / "gguf" / SMOLLM2), "as": "smollm2_135m_(Q4_1)"},
    ]
    assert SMOL not in by_name(demo_registry)
    curated = (demo_registry / "model_registry.curated.json").read_bytes()

    locked = subprocess.run(
        [str(LOADER), "--registry-dir", str(demo_registry), "lock", VL],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SOURCE), "IMAGEWORKS_OLLAMA_HOST": ollama.url},
        timeout=60,
        check=False,
    )
    assert locked.returncode == 0, locked.stderr
    again = discover(demo_registry, *args)
    assert again["changed"] is False
    assert by_name(demo_registry)[VL]["version_lock"]["locked"] is True
    assert (demo_registry / "model_registry.curated.json").read_bytes() == curated


def test_a_weights_directory_that_does_not_exist_is_one_line_error(registry: Path) -> None:
    result = run(registry, "--weights-dir", str(registry / "nowhere"), "--no-ollama")
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("imageworks-loader: error: weights directory ")
    assert line.endswith("(is its disk mounted?)")


def test_the_weights_directory_comes_from_the_environment(registry: Path, weights: Path) -> None:
    document = discover(registry, "--no-ollama", IMAGEWORKS_WEIGHTS_DIR=str(weights))
    assert document["sources"]["weights"]["dir"] == str(weights)
    assert len(document["added"]) == 3


def test_ollama_host_and_no_ollama_together_are_bad_usage(registry: Path) -> None:
    result = run(registry, "--ollama-host", "http://x", "--no-ollama")
    assert result.returncode == 2
    assert "not allowed" in result.stderr


def test_a_running_proxy_lists_the_discovered_gguf_without_a_restart(
    tmp_path: Path, demo_models: Path
) -> None:
    root = tmp_path / "ws"
    configs = root / "configs"
    demo = read_json(Path(__file__).parents[2] / "configs" / "model_registry.curated.json")
    gemma = next(e for e in demo if e["name"] == GEMMA_CURATED)
    gemma = {**gemma, "download_path": str(demo_models / gemma["download_path"].rsplit("/")[-1])}
    gemma["backend_config"] = {**gemma["backend_config"], "model_path": gemma["download_path"]}
    write_json(configs / "model_registry.curated.json", [gemma])
    weights = root / "weights"
    weights.mkdir()
    (weights / SMOLLM2).symlink_to(demo_models / SMOLLM2)

    workspace = Workspace(root)
    with workspace.serving() as proxy:
        ids = [m["id"] for m in httpx.get(f"{proxy.url}/v1/models", timeout=10).json()["data"]]
        assert ids == ["gemma3 270m (Q4 K M)"]
        result = workspace.loader("discover", "--weights-dir", str(weights), "--no-ollama")
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 30
        while SMOL_SHOWN not in ids and time.monotonic() < deadline:
            time.sleep(0.2)
            listing = httpx.get(f"{proxy.url}/v1/models", timeout=10).json()["data"]
            ids = [m["id"] for m in listing]
        assert ids == ["gemma3 270m (Q4 K M)", SMOL_SHOWN]
        reply = proxy.chat(SMOL_SHOWN, max_tokens=4)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["role"] == "assistant"
