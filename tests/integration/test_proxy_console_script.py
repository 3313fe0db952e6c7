"""The real `imageworks-chat-proxy` console script's command line: `--help` and `--version`
print and exit 0, bad usage exits 2, and neither starts a server; the flags name the port and
the registry it serves, over the environment, and survive a restart."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import entry, write_json
from imageworks.chat_proxy.app import VERSION
from support import child_processes
from support.proxy_process import PROXY, RunningProxy, Workspace, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def nothing_listens_on(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def write_registry(directory: Path, *names: str) -> Path:
    """A registry of llama.cpp entries whose weights are nowhere: served, never started."""
    write_json(directory / "model_registry.curated.json", [entry(name) for name in names])
    return directory


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A workspace whose environment names a registry of one entry (`decoy_7b`), and whose
    CHAT_PROXY_PORT is no port the tests ask for (flags choose both)."""
    decoy = write_registry(tmp_path / "env-registry", "decoy_7b")
    env = {"CHAT_PROXY_PORT": str(free_port()), "IMAGEWORKS_REGISTRY_DIR": str(decoy)}
    return Workspace(tmp_path, extra_env=env)


def run_proxy(workspace: Workspace, *args: str) -> subprocess.CompletedProcess[str]:
    return child_processes.run(
        [str(PROXY), *args],
        cwd=workspace.root,
        env=workspace.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def environment_port(workspace: Workspace) -> int:
    return int(workspace.env()["CHAT_PROXY_PORT"])


def test_console_script_help_prints_usage_and_starts_no_server(workspace: Workspace) -> None:
    result = run_proxy(workspace, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("usage: imageworks-chat-proxy ")
    help_text = " ".join(result.stdout.split())
    assert "--port N port to listen on (sets CHAT_PROXY_PORT; default: 8100)" in help_text
    assert "README.md (section Configuration)" in help_text
    assert nothing_listens_on(environment_port(workspace))


def test_console_script_version_prints_the_version_and_starts_no_server(
    workspace: Workspace,
) -> None:
    result = run_proxy(workspace, "--version")
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == (f"imageworks-chat-proxy {VERSION}\n", "")
    assert nothing_listens_on(environment_port(workspace))


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--port", "abc"], "argument --port: not a port number: 'abc'"),
        (["--port", "70000"], "argument --port: not a port number (0 to 65535): '70000'"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_console_script_bad_usage_is_one_line_exit_2_and_starts_no_server(
    workspace: Workspace, args: list[str], problem: str
) -> None:
    result = run_proxy(workspace, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"imageworks-chat-proxy: error: {problem}")
    assert result.stderr.endswith("; see `imageworks-chat-proxy --help`\n")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert nothing_listens_on(environment_port(workspace))


def flagged(workspace: Workspace) -> tuple[str, ...]:
    """Flags for the workspace's proxy port and a registry of two entries (not the decoy)."""
    registry = write_registry(workspace.root / "flag-registry", "first_1b", "second_1b")
    return ("--port", str(workspace.proxy_port), "--registry-dir", str(registry))


def test_console_script_serves_the_port_and_registry_its_flags_name(
    workspace: Workspace,
) -> None:
    with workspace.serving(*flagged(workspace), "--log-level", "warning") as proxy:
        assert proxy.health()["registry_entries"] == 2
        assert nothing_listens_on(environment_port(workspace))
    # uvicorn's start-up lines and the proxy's own are INFO: the level reached both loggers.
    assert "INFO" not in (workspace.root / "proxy.out").read_text()


def boot_id(proxy: RunningProxy) -> str | None:
    try:
        response = httpx.get(f"{proxy.url}/v1/admin/overview", timeout=10)
    except httpx.HTTPError:
        return None  # between the old program and the new one
    boot: str = response.json()["proxy"]["boot_id"]
    return boot


def test_console_script_flags_survive_a_restart(workspace: Workspace) -> None:
    argv = flagged(workspace)
    with workspace.serving(*argv) as proxy:
        first_boot = boot_id(proxy)
        response = httpx.post(f"{proxy.url}/v1/admin/restart", json={}, timeout=10)
        assert response.status_code == 202, response.text
        while boot_id(proxy) in (first_boot, None):  # the test's timeout bounds the wait
            assert proxy.process.poll() is None, (workspace.root / "proxy.out").read_text()
            time.sleep(0.1)
        assert proxy.health()["registry_entries"] == 2
        command_line = Path(f"/proc/{proxy.process.pid}/cmdline").read_bytes().split(b"\0")
        assert command_line[-len(argv) - 1 : -1] == [arg.encode() for arg in argv]
