"""The deployment files say what the documents say: the compose files as `docker-compose config`
reads them (it parses and interpolates without a daemon), the Dockerfile's instructions and its
RUN scripts run against stub programs, the systemd unit, and the README's account of them."""

from __future__ import annotations

import configparser
import fnmatch
import os
import re
import shlex
import stat
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO_ROOT
from imageworks.chat_proxy.config import ENV_PREFIX, ProxySettings, load_settings
from imageworks.config import RegistrySettings
from support.deploy_files import (
    Instruction,
    Port,
    build_arguments,
    dockerfile_instructions,
    environment,
    gpu_devices,
    mount_at,
    ports,
    seconds,
)
from support.tools import require_program

pytestmark = pytest.mark.timeout(60)

DOCKERFILE = REPO_ROOT / "Dockerfile.chat-proxy"
PROXY_COMPOSE = "docker-compose.chat-proxy.yml"
OPENWEBUI_COMPOSE = "docker-compose.openwebui.yml"
UNIT = REPO_ROOT / "deploy" / "imageworks-chat-proxy.service"
ENV_EXAMPLE = REPO_ROOT / "deploy" / "chat-proxy.env.example"
DEPLOY_FILES = (
    DOCKERFILE,
    REPO_ROOT / PROXY_COMPOSE,
    REPO_ROOT / OPENWEBUI_COMPOSE,
    UNIT,
    ENV_EXAMPLE,
)
MODELS_DIR = "/srv/ai-models"
# Read by compose to place a mount, never by the proxy.
COMPOSE_ONLY_VARIABLES = {"IMAGEWORKS_MODELS_DIR"}
SETTING_NAME = re.compile(r"\b(?:CHAT_PROXY|IMAGEWORKS)_[A-Z0-9_]*[A-Z0-9]\b")
OPENWEBUI_ENVIRONMENT = {  # the reference document's block, word for word
    "OPENAI_API_BASE_URL": "http://chat-proxy:8100/v1",
    "OPENAI_API_KEY": "EMPTY",
    "ENABLE_OLLAMA_API": "false",
    "OLLAMA_BASE_URLS": "",
    "OLLAMA_API_CONFIGS": "",
    "RESET_CONFIG_ON_START": "true",
}


def known_settings() -> set[str]:
    proxy = {ENV_PREFIX + name.upper() for name in ProxySettings.model_fields}
    registry = {"IMAGEWORKS_" + name.upper() for name in RegistrySettings.model_fields}
    return proxy | registry


def compose_config(name: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` on a file of the repository, its variables from `variables` only
    (never the caller's shell or a developer's .env)."""
    docker_compose = require_program("docker-compose", "docker-compose")
    descriptor, env_file = tempfile.mkstemp(suffix=".env", dir=tmp_path)
    with os.fdopen(descriptor, "w") as file:
        file.write("".join(f"{key}={value}\n" for key, value in variables.items()))
    scrubbed = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CHAT_PROXY_", "IMAGEWORKS_", "COMPOSE_", "DOCKER_"))
    }
    command = [docker_compose, "--env-file", env_file, "-f", str(REPO_ROOT / name), "config"]
    return subprocess.run(
        command, capture_output=True, text=True, env=scrubbed, timeout=30, check=False
    )


# Each run of docker-compose takes a second or two (mostly its imports), so every run the tests
# need is made once, all at the same time.
COMPOSE_RUNS: dict[str, tuple[str, dict[str, str]]] = {
    PROXY_COMPOSE: (PROXY_COMPOSE, {"IMAGEWORKS_MODELS_DIR": MODELS_DIR}),
    OPENWEBUI_COMPOSE: (OPENWEBUI_COMPOSE, {"IMAGEWORKS_MODELS_DIR": MODELS_DIR}),
    "proxy without weights": (PROXY_COMPOSE, {}),
    "openwebui without weights": (OPENWEBUI_COMPOSE, {}),
    "proxy with keys": (
        PROXY_COMPOSE,
        {
            "IMAGEWORKS_MODELS_DIR": MODELS_DIR,
            "CHAT_PROXY_API_KEYS": "@/run/secrets/keys",
            "CHAT_PROXY_ADMIN_KEY": "admin-secret",
        },
    ),
}


@pytest.fixture(scope="module")
def compose_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str]]:
    require_program("docker-compose", "docker-compose")
    tmp_path = tmp_path_factory.mktemp("compose")
    with ThreadPoolExecutor(len(COMPOSE_RUNS)) as pool:
        futures = {
            label: pool.submit(compose_config, name, tmp_path, **variables)
            for label, (name, variables) in COMPOSE_RUNS.items()
        }
        return {label: future.result() for label, future in futures.items()}


def resolved_services(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    services: dict[str, dict[str, Any]] = yaml.safe_load(result.stdout)["services"]
    return services


@pytest.fixture(scope="module")
def services(
    compose_runs: dict[str, subprocess.CompletedProcess[str]],
) -> dict[str, dict[str, Any]]:
    """Both compose files, as compose resolved them: `{file: {service: definition}}`."""
    return {
        name: resolved_services(compose_runs[name]) for name in (PROXY_COMPOSE, OPENWEBUI_COMPOSE)
    }


def proxies(services: dict[str, dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, file_services in services.items():
        yield name, file_services["chat-proxy"]


# -- compose ---------------------------------------------------------------------------------


def test_compose_files_name_containers_as_the_documents_commands_do(
    services: dict[str, dict[str, Any]],
) -> None:
    names = {
        name: {service: spec["container_name"] for service, spec in file_services.items()}
        for name, file_services in services.items()
    }
    assert names[PROXY_COMPOSE] == {
        "chat-proxy": "imageworks-chat-proxy",
        "imageworks-ollama": "imageworks-ollama",
    }
    assert names[OPENWEBUI_COMPOSE] == {
        "chat-proxy": "imageworks-chat-proxy",
        "openwebui": "openwebui",
    }


def test_compose_refuses_to_start_without_the_weights_directory(
    compose_runs: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    for label in ("proxy without weights", "openwebui without weights"):
        assert compose_runs[label].returncode != 0, label
        assert "IMAGEWORKS_MODELS_DIR" in compose_runs[label].stderr, label


def test_compose_proxy_serves_8100_and_checks_v1_health_there(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, proxy in proxies(services):
        assert ports(proxy) == [Port("127.0.0.1", 8100, 8100)], name
        test = proxy["healthcheck"]["test"]
        assert test[:2] == ["CMD", "curl"], name
        assert "-f" in test[2], name
        assert test[-1] == "http://127.0.0.1:8100/v1/health", name


def test_compose_proxy_environment_is_accepted_by_the_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, proxy in proxies(services):
        for key in list(os.environ):
            if key.startswith(("CHAT_PROXY_", "IMAGEWORKS_")):
                monkeypatch.delenv(key)
        for key, value in environment(proxy).items():
            monkeypatch.setenv(key, value)
        settings, registry = load_settings(), RegistrySettings()
        assert (settings.host, settings.port) == ("0.0.0.0", 8100), name
        assert settings.restart_mode == "exit", name
        assert settings.loopback_alias == "host.docker.internal", name
        assert {"chat-proxy", "imageworks-chat-proxy"} <= settings.allowed_hosts, name
        assert settings.api_keys == frozenset(), name
        assert settings.admin_key is None, name
        assert settings.vllm_single_port, name
        assert not settings.leave_model_running, name
        assert registry.registry_dir == Path(mount_at(proxy, "/app/configs").target), name
        assert "host.docker.internal:host-gateway" in proxy["extra_hosts"], name


def test_compose_proxy_takes_keys_from_the_shell(
    compose_runs: dict[str, subprocess.CompletedProcess[str]],
) -> None:
    proxy = resolved_services(compose_runs["proxy with keys"])["chat-proxy"]
    assert environment(proxy)["CHAT_PROXY_API_KEYS"] == "@/run/secrets/keys"
    assert environment(proxy)["CHAT_PROXY_ADMIN_KEY"] == "admin-secret"


def test_compose_proxy_mounts_weights_at_the_same_path_and_the_repository_under_app(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, proxy in proxies(services):
        weights = mount_at(proxy, MODELS_DIR)
        assert (weights.source, weights.read_only) == (MODELS_DIR, True), name
        for directory in ("configs", "logs", "_staging"):
            mount = mount_at(proxy, f"/app/{directory}")
            assert mount.source == str(REPO_ROOT / directory), name
            assert not mount.read_only, name
        # The state file and the logs land in the mounts: their defaults are relative to /app.
        settings = ProxySettings()
        assert settings.vllm_state_path.parts[0] == "_staging"
        assert settings.log_path.parts[0] == settings.backend_log_dir.parts[0] == "logs"


def test_compose_reserves_every_gpu_for_the_proxy_and_ollama(
    services: dict[str, dict[str, Any]],
) -> None:
    gpu = [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu_devices(services[PROXY_COMPOSE]["chat-proxy"]) == gpu
    assert gpu_devices(services[PROXY_COMPOSE]["imageworks-ollama"]) == gpu
    assert gpu_devices(services[OPENWEBUI_COMPOSE]["chat-proxy"]) == gpu
    assert gpu_devices(services[OPENWEBUI_COMPOSE]["openwebui"]) == []


def test_compose_ollama_keeps_models_in_ollama_data_and_the_proxy_finds_it_by_name(
    services: dict[str, dict[str, Any]],
) -> None:
    ollama = services[PROXY_COMPOSE]["imageworks-ollama"]
    assert ports(ollama) == [Port("127.0.0.1", 11434, 11434)]
    assert mount_at(ollama, "/root/.ollama").source == str(REPO_ROOT / "ollama-data")
    proxy = services[PROXY_COMPOSE]["chat-proxy"]
    assert environment(proxy)["IMAGEWORKS_OLLAMA_HOST"] == "http://imageworks-ollama:11434"
    assert proxy["depends_on"] == {"imageworks-ollama": {"condition": "service_started"}}


def test_compose_openwebui_is_wired_exactly_as_the_reference_shows(
    services: dict[str, dict[str, Any]],
) -> None:
    openwebui = services[OPENWEBUI_COMPOSE]["openwebui"]
    assert environment(openwebui) == OPENWEBUI_ENVIRONMENT
    assert openwebui["image"] == "ghcr.io/open-webui/open-webui:latest"
    assert openwebui["depends_on"] == {"chat-proxy": {"condition": "service_healthy"}}
    assert ports(openwebui) == [Port("", 3000, 8080)]
    assert mount_at(openwebui, "/app/backend/data").source == "openwebui-data"
    proxy = services[OPENWEBUI_COMPOSE]["chat-proxy"]
    assert environment(proxy)["IMAGEWORKS_OLLAMA_HOST"] == "http://host.docker.internal:11434"


def test_compose_services_restart_and_the_proxy_has_time_to_stop_its_model(
    services: dict[str, dict[str, Any]],
) -> None:
    for file_services in services.values():
        for service in file_services.values():
            assert service["restart"] == "unless-stopped"
    stop = ProxySettings().vllm_stop_timeout_s
    # uvicorn's graceful shutdown (stop + 15 s, app.py), then the model server's SIGTERM grace.
    needed = (stop + 15) + stop
    for name, proxy in proxies(services):
        assert proxy["stop_signal"] == "SIGTERM", name
        assert seconds(proxy["stop_grace_period"]) >= needed, name


def test_compose_files_define_the_same_proxy_but_for_where_ollama_runs(
    services: dict[str, dict[str, Any]],
) -> None:
    def shared(proxy: dict[str, Any]) -> dict[str, Any]:
        rest = {key: value for key, value in proxy.items() if key != "depends_on"}
        rest["environment"] = {
            key: value
            for key, value in environment(proxy).items()
            if key != "IMAGEWORKS_OLLAMA_HOST"
        }
        return rest

    assert shared(services[PROXY_COMPOSE]["chat-proxy"]) == shared(
        services[OPENWEBUI_COMPOSE]["chat-proxy"]
    )


# -- Dockerfile ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile_instructions(DOCKERFILE)


def only(instructions: list[Instruction], keyword: str) -> str:
    found = [i.arguments for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def run_script(instructions: list[Instruction], containing: str) -> str:
    found = [i.arguments for i in instructions if i.keyword == "RUN" and containing in i.arguments]
    assert len(found) == 1, f"expected one RUN with {containing!r}, found {found}"
    return found[0]


def test_dockerfile_defaults_to_the_cuda_12_8_runtime_on_ubuntu_22_04(
    instructions: list[Instruction],
) -> None:
    arguments = build_arguments(instructions)
    assert re.fullmatch(r"nvidia/cuda:12\.8\.\d+-runtime-ubuntu22\.04", arguments["BASE_IMAGE"])
    stages = [i.arguments for i in instructions if i.keyword == "FROM"]
    assert stages[-1] == "${BASE_IMAGE}"
    assert arguments["WITH_VLLM"] == "1"
    assert arguments["WITH_LLAMACPP"] == "0"
    assert arguments["VLLM_REQUIREMENT"].startswith("vllm[vision]")


def test_dockerfile_runs_the_proxy_under_tini_on_8100(instructions: list[Instruction]) -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "imageworks-chat-proxy" in scripts
    assert only(instructions, "ENTRYPOINT") == '["tini", "--"]'
    assert only(instructions, "CMD") == '["imageworks-chat-proxy"]'
    assert only(instructions, "STOPSIGNAL") == "SIGTERM"
    assert only(instructions, "EXPOSE") == "8100"
    assert "/v1/health" in only(instructions, "HEALTHCHECK")
    env: dict[str, str] = {}
    for arguments in (i.arguments for i in instructions if i.keyword == "ENV"):
        env.update(item.partition("=")[::2] for item in shlex.split(arguments))
    assert env["CHAT_PROXY_HOST"] == "0.0.0.0"
    assert env["CHAT_PROXY_PORT"] == "8100"
    assert env["IMAGEWORKS_REGISTRY_DIR"] == "/app/configs"
    assert only(instructions, "WORKDIR") == "/app"
    assert "/opt/venv/bin" in env["PATH"].split(":")


def run_with_stubs(script: str, tmp_path: Path, **build_args: str) -> list[list[str]]:
    """Run a RUN script as the builder would (build arguments in the environment), with every
    program it calls replaced by a stub that records its arguments; the calls, in order."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    log.write_text("")
    for program in ("apt-get", "uv", "python", "rm", "mkdir"):
        stub = stubs / program
        stub.write_text(
            '#!/bin/sh\nprintf "%s\\037" "${0##*/}" "$@" >> "$CALLS"\necho >> "$CALLS"\n'
        )
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {"PATH": str(stubs), "CALLS": str(log), **build_args}
    subprocess.run(["/bin/sh", "-c", script], env=env, cwd=tmp_path, check=True, timeout=10)
    return [line.rstrip("\x1f").split("\x1f") for line in log.read_text().splitlines()]


@pytest.mark.parametrize("with_vllm", ["0", "1"])
def test_dockerfile_installs_vllm_only_when_asked(
    instructions: list[Instruction], tmp_path: Path, with_vllm: str
) -> None:
    arguments = {**build_arguments(instructions), "WITH_VLLM": with_vllm}
    calls = run_with_stubs(run_script(instructions, "VLLM_REQUIREMENT"), tmp_path, **arguments)
    installs = [call for call in calls if call[:3] == ["uv", "pip", "install"]]
    if with_vllm == "0":
        assert calls == []
        return
    assert len(installs) == 1
    assert installs[0][-1] == arguments["VLLM_REQUIREMENT"]
    # Constrained to the lock: vLLM may not move the proxy's own dependencies.
    export = next(call for call in calls if call[:2] == ["uv", "export"])
    assert "--locked" in export
    assert "--no-default-groups" in export
    constraint = installs[0][installs[0].index("--constraint") + 1]
    assert export[export.index("--output-file") + 1] == constraint


@pytest.mark.parametrize("with_llamacpp", ["0", "1"])
def test_dockerfile_syncs_the_lock_without_dev_and_demo_unless_asked(
    instructions: list[Instruction], tmp_path: Path, with_llamacpp: str
) -> None:
    arguments = {**build_arguments(instructions), "WITH_LLAMACPP": with_llamacpp}
    dependencies = run_script(instructions, "--no-install-project")
    project = run_script(instructions, "--inexact")
    syncs = [
        call
        for script in (dependencies, project)
        for call in run_with_stubs(script, tmp_path, **arguments)
        if call[:2] == ["uv", "sync"]
    ]
    assert len(syncs) == 2
    for sync in syncs:
        assert "--locked" in sync
        assert "--no-default-groups" in sync
        assert ("demo" in sync) == (with_llamacpp == "1")
        assert "dev" not in sync
    # The project's sync must keep vLLM, which the lock does not list.
    assert "--inexact" in syncs[1]


@pytest.mark.parametrize(("with_vllm", "with_llamacpp"), [("0", "0"), ("1", "0"), ("0", "1")])
def test_dockerfile_installs_curl_tini_and_compilers_only_for_what_needs_them(
    instructions: list[Instruction], tmp_path: Path, with_vllm: str, with_llamacpp: str
) -> None:
    arguments = {"WITH_VLLM": with_vllm, "WITH_LLAMACPP": with_llamacpp}
    calls = run_with_stubs(run_script(instructions, "apt-get install"), tmp_path, **arguments)
    installed = {package for call in calls if "install" in call for package in call}
    assert {"curl", "tini", "ca-certificates"} <= installed
    assert ("build-essential" in installed) == ("1" in (with_vllm, with_llamacpp))
    assert ("cmake" in installed) == (with_llamacpp == "1")


def test_dockerignore_leaves_out_local_state_but_not_what_the_image_copies(
    instructions: list[Instruction],
) -> None:
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for local in (".venv", "logs", "_staging", "ollama-data", ".git", ".env", ".mypy_cache"):
        assert local in patterns
    copied = [
        source
        for i in instructions
        if i.keyword == "COPY" and not i.arguments.startswith("--from")
        for source in i.arguments.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert (REPO_ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in patterns), source


# -- every file ------------------------------------------------------------------------------


def test_deploy_files_name_only_real_settings() -> None:
    known = known_settings() | COMPOSE_ONLY_VARIABLES
    for path in DEPLOY_FILES:
        unknown = set(SETTING_NAME.findall(path.read_text())) - known
        assert not unknown, f"{path.name} names settings that do not exist: {sorted(unknown)}"


def test_compose_only_variables_never_reach_the_proxy(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, proxy in proxies(services):
        assert not COMPOSE_ONLY_VARIABLES & set(environment(proxy)), name


# -- systemd ---------------------------------------------------------------------------------


def test_systemd_unit_runs_the_proxy_and_lets_it_stop_its_model_server() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(UNIT.read_text())
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    assert service["ExecStart"].split()[0].endswith("/.venv/bin/imageworks-chat-proxy")
    assert service["Restart"] == "always"
    assert service["KillMode"] == "mixed"
    assert service["EnvironmentFile"] == "-/etc/imageworks/chat-proxy.env"
    assert service["WorkingDirectory"].startswith("/")
    stop = ProxySettings().vllm_stop_timeout_s
    assert int(service["TimeoutStopSec"]) >= (stop + 15) + stop
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_env_example_is_plain_assignments_the_settings_accept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in list(os.environ):
        if key.startswith(("CHAT_PROXY_", "IMAGEWORKS_")):
            monkeypatch.delenv(key)
    for line in ENV_EXAMPLE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, separator, value = line.partition("=")
        assert separator, line
        assert key == key.strip(), line
        assert not value.startswith(('"', "'")), line
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.restart_mode == "exec"
    assert RegistrySettings().registry_dir.is_absolute()


# -- README ----------------------------------------------------------------------------------


def deployment_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"^## Deployment\n(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert match is not None, "README.md has no ## Deployment section"
    return match.group(1)


def test_readme_deployment_section_names_every_file_and_the_documents_commands() -> None:
    section = deployment_section()
    for path in DEPLOY_FILES:
        assert str(path.relative_to(REPO_ROOT)) in section
    for command in (
        "docker compose -f docker-compose.chat-proxy.yml up -d",
        "docker compose build chat-proxy",
        "docker restart imageworks-chat-proxy",
        "docker exec -it imageworks-ollama ollama pull mistral:instruct",
        "docker exec -t openwebui curl -s http://chat-proxy:8100/v1/models",
        "--build-arg BASE_IMAGE=python:3.12-slim --build-arg WITH_VLLM=0",
    ):
        assert command in section, command


def test_readme_deployment_commands_name_containers_the_compose_files_create(
    services: dict[str, dict[str, Any]],
) -> None:
    containers = {
        spec["container_name"]
        for file_services in services.values()
        for spec in file_services.values()
    }
    named = re.findall(r"docker (?:restart|exec(?: -\w+)*) ([\w-]+)", deployment_section())
    assert named
    assert set(named) <= containers
