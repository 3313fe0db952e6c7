from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imageworks.backends.argv import merge_args
from imageworks.backends.base import BackendNotReady
from imageworks.backends.llamacpp import llamacpp_argv, llamacpp_launch
from imageworks.backends.router import BackendRouter
from imageworks.backends.vllm import vllm_argv
from imageworks.registry.schema import RegistryEntry


def _entry(backend: str, **fields: Any) -> RegistryEntry:
    return RegistryEntry.model_validate({"name": "m_(Q4_K_M)", "backend": backend, **fields})


def test_merge_args_extra_args_override_defaults_without_duplicates() -> None:
    argv = merge_args(
        [("--port", "1"), ("--n_ctx", "512"), ("--host", "127.0.0.1")],
        ["--n-ctx=4096", "--port", "2", "--verbose"],
    )
    assert argv == ["--host", "127.0.0.1", "--n-ctx=4096", "--port", "2", "--verbose"]


def test_merge_args_negative_numbers_are_values_not_flags() -> None:
    assert merge_args([("--seed", "1")], ["--temp", "-1"]) == ["--seed", "1", "--temp", "-1"]


def test_llamacpp_argv_for_llama_cpp_python() -> None:
    entry = _entry(
        "llamacpp",
        served_model_id="smol",
        backend_config={"extra_args": ["--chat_format", "gemma", "--n_ctx", "1024"]},
    )
    argv = llamacpp_argv(entry, Path("/m/x.gguf"), host="127.0.0.1", port=24001, python="py")
    assert argv == [
        "py", "-m", "llama_cpp.server",
        "--model", "/m/x.gguf", "--host", "127.0.0.1", "--port", "24001",
        "--model_alias", "smol",
        "--chat_format", "gemma", "--n_ctx", "1024",
    ]  # fmt: skip


def test_llamacpp_argv_for_native_llama_server() -> None:
    entry = _entry("llamacpp", backend_config={"extra_args": ["-c", "8192"]})
    argv = llamacpp_argv(
        entry, Path("/m/x.gguf"), host="127.0.0.1", port=9, server_binary="/opt/llama-server"
    )
    assert argv[0] == "/opt/llama-server"
    assert argv[argv.index("--alias") + 1] == "m_(Q4_K_M)"  # no served id: the logical name
    assert argv[-2:] == ["-c", "8192"]


def test_llamacpp_launch_needs_the_model_file(tmp_path: Path) -> None:
    entry = _entry("llamacpp", download_path="missing.gguf")
    with pytest.raises(BackendNotReady, match=r"missing\.gguf not found"):
        llamacpp_launch(entry, registry_dir=tmp_path, port=1, log_dir=tmp_path)


def test_llamacpp_launch_logs_under_backend_dir(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    entry = _entry("llamacpp", download_path="x.gguf")
    spec = llamacpp_launch(entry, registry_dir=tmp_path, port=24001, log_dir=tmp_path / "logs")
    assert spec.log_path == tmp_path / "logs" / "llamacpp" / "m_Q4_K_M.log"
    assert spec.port == 24001
    assert str(tmp_path / "x.gguf") in spec.argv


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    directory = tmp_path / "Qwen2.5-VL-7B-AWQ"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    return directory


def test_vllm_argv_defaults(weights: Path, tmp_path: Path) -> None:
    entry = _entry("vllm", download_path=str(weights), served_model_id="qwen-vl")
    argv = vllm_argv(
        entry,
        registry_dir=tmp_path,
        host="127.0.0.1",
        port=24001,
        gpu_memory_utilization=0.75,
        max_model_len=None,
        launcher=("python", "-m", "vllm.entrypoints.openai.api_server"),
    )
    assert argv == [
        "python", "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(weights), "--served-model-name", "qwen-vl",
        "--host", "127.0.0.1", "--port", "24001", "--gpu-memory-utilization", "0.75",
    ]  # fmt: skip


def test_vllm_argv_template_max_len_and_extra_args_win(weights: Path, tmp_path: Path) -> None:
    entry = _entry(
        "vllm",
        download_path=str(weights),
        chat_template={"source": "external", "path": "templates/qwen.jinja"},
        backend_config={"extra_args": ["--max-model-len", "8192", "--enforce-eager"]},
    )
    argv = vllm_argv(
        entry,
        registry_dir=tmp_path,
        host="127.0.0.1",
        port=24001,
        gpu_memory_utilization=0.5,
        max_model_len=4096,
    )
    assert argv.count("--max-model-len") == 1
    assert argv[argv.index("--max-model-len") + 1] == "8192"
    assert argv[argv.index("--chat-template") + 1] == str(tmp_path / "templates/qwen.jinja")
    assert argv[argv.index("--served-model-name") + 1] == "m_(Q4_K_M)"
    assert argv[-1] == "--enforce-eager"


def test_vllm_argv_refuses_missing_weights(tmp_path: Path) -> None:
    entry = _entry("vllm", download_path=str(tmp_path / "nope"))
    with pytest.raises(BackendNotReady, match="weights not found"):
        vllm_argv(
            entry,
            registry_dir=tmp_path,
            host="h",
            port=1,
            gpu_memory_utilization=0.9,
            max_model_len=None,
        )


@pytest.mark.parametrize(
    ("backend", "single_port", "chosen"),
    [
        ("llamacpp", True, "managed"),
        ("vllm", True, "managed"),
        ("vllm", False, "external"),  # orchestration off: its own backend_config URL
        ("ollama", True, "ollama"),
        ("external", True, "external"),
    ],
)
def test_router_picks_the_backend(backend: str, single_port: bool, chosen: str) -> None:
    backends: dict[str, Any] = {name: object() for name in ("managed", "ollama", "external")}
    router = BackendRouter(
        managed=backends["managed"],
        ollama=backends["ollama"],
        external=backends["external"],
        vllm_single_port=single_port,
    )
    assert router.backend_for(_entry(backend)) is backends[chosen]


def test_router_refuses_unknown_backends() -> None:
    router = BackendRouter(
        managed=object(),  # type: ignore[arg-type]
        ollama=object(),  # type: ignore[arg-type]
        external=object(),  # type: ignore[arg-type]
        vllm_single_port=True,
    )
    with pytest.raises(BackendNotReady, match="'triton' is not supported"):
        router.backend_for(_entry("triton"))
