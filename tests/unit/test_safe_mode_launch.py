"""Safe mode in the launch plans and the state file: which arguments each launcher adds, that
they go last, and that a safe-mode record still names its entry's own command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imageworks.backends.llamacpp import LlamaCppPython, LlamaServer, llamacpp_launch
from imageworks.backends.safe_mode import SafeModeMemory, default_memory_path
from imageworks.backends.state import ManagedState
from imageworks.backends.supervisor import LaunchSpec
from imageworks.backends.vllm import vllm_launch
from imageworks.registry.schema import RegistryEntry


def gguf_entry(tmp_path: Path) -> RegistryEntry:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    return RegistryEntry(name="m", backend="llamacpp", download_path=str(tmp_path / "m.gguf"))


def test_llama_server_retries_without_weight_repacking(tmp_path: Path) -> None:
    launcher = LlamaServer(Path("/usr/bin/llama-server"))
    spec = llamacpp_launch(
        gguf_entry(tmp_path), registry_dir=tmp_path, port=9, log_dir=tmp_path, launcher=launcher
    )
    assert spec.safe_mode_args == ("--no-repack",)
    assert "CHAT_PROXY_LLAMA_SERVER_BINARY" in spec.crash_hint
    safe = spec.in_safe_mode()
    assert safe.argv == (*spec.argv, "--no-repack")
    assert safe.safe_mode
    assert safe.requested_argv == spec.argv
    assert safe.in_safe_mode() is safe  # added once


def test_llama_cpp_python_has_no_safe_mode(tmp_path: Path) -> None:
    spec = llamacpp_launch(
        gguf_entry(tmp_path),
        registry_dir=tmp_path,
        port=9,
        log_dir=tmp_path,
        launcher=LlamaCppPython(),
    )
    assert spec.safe_mode_args == ()
    assert SafeModeMemory(None, "always").recall(spec) is None


def test_vllm_retries_in_eager_mode(tmp_path: Path) -> None:
    weights = tmp_path / "model"
    weights.mkdir()
    entry = RegistryEntry(name="v", backend="vllm", download_path=str(weights))
    spec = vllm_launch(
        entry,
        registry_dir=tmp_path,
        port=9,
        log_dir=tmp_path,
        gpu_memory_utilization=0.5,
        max_model_len=None,
    )
    assert spec.safe_mode_args == ("--enforce-eager",)
    assert spec.in_safe_mode().argv[-1] == "--enforce-eager"
    assert "--enforce-eager" not in spec.argv


def record(**fields: object) -> ManagedState:
    base: dict[str, object] = {
        "entry": "m",
        "served_model_id": "m",
        "backend": "llamacpp",
        "port": 9,
        "pid": 1,
        "process_start": 1,
        "command": ["llama-server", "--port", "9", "--no-repack"],
        "started_at": "2026-12-08T00:00:00+00:00",
        "log_path": "/tmp/m.log",
        "owner": "proxy",
        "safe_mode": ["--no-repack"],
    }
    return ManagedState(**{**base, **fields})  # type: ignore[arg-type]


def test_a_safe_mode_record_names_the_command_its_entry_asks_for() -> None:
    state = record()
    assert state.requested_command == ("llama-server", "--port", "9")
    assert ManagedState.from_json(state.to_json()) == state


def test_a_record_from_before_safe_mode_reads_as_a_normal_start() -> None:
    written = json.loads(record(command=["llama-server"], safe_mode=[]).to_json())
    del written["safe_mode"]
    state = ManagedState.from_json(json.dumps(written))
    assert state.safe_mode == []
    assert state.requested_command == ("llama-server",)


def test_safe_mode_arguments_must_end_the_command() -> None:
    with pytest.raises(ValueError, match="safe_mode"):
        record(command=["llama-server", "--no-repack", "--port", "9"])


def test_the_memory_lives_in_the_users_cache() -> None:
    assert default_memory_path({"XDG_CACHE_HOME": "/c"}) == Path("/c/imageworks/safe-mode.json")
    assert default_memory_path({}).parts[-3:] == (".cache", "imageworks", "safe-mode.json")


def test_a_program_that_is_not_there_is_never_remembered(tmp_path: Path) -> None:
    memory = SafeModeMemory(tmp_path / "memory.json")
    spec = LaunchSpec("m", ("/nowhere/llama-server",), 9, tmp_path / "l", safe_mode_args=("-x",))
    memory.remember(spec, "crashed")
    assert memory.recall(spec) is None
    assert not (tmp_path / "memory.json").exists()


def test_an_unreadable_memory_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "memory.json"
    path.write_text("{not json")
    program = tmp_path / "server"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    spec = LaunchSpec("m", (str(program),), 9, tmp_path / "l", safe_mode_args=("-x",))
    memory = SafeModeMemory(path)
    assert memory.recall(spec) is None
    memory.remember(spec, "crashed")  # and replaced by a good one
    assert SafeModeMemory(path).recall(spec) is not None
