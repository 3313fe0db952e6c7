"""`imageworks-loader doctor` through its real console script, on the demo registry: the real
llama-server and models, the real proxy, a fake Ollama, and real processes holding ports."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from imageworks.backends.llamacpp import find_llama_server
from imageworks.backends.safe_mode import SafeModeMemory
from imageworks.backends.supervisor import LaunchSpec
from support import child_processes
from support.crashing_server import SAFE_FLAG as SAFE
from support.crashing_server import write_crashing_launcher
from support.fake_ollama import FakeOllama
from support.model_servers import serve_through
from support.proxy_process import Workspace, processes_listening_on

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SMOL = "smollm2 135m (Q4 1)"
CHECKS = ["registry", "llama-server", "gpu", "ollama", "proxy port", "model port", "model"]
OTHER_CHECKS = ["settings", "llama-cpp-py", "vllm"]  # when they apply
# Answers `--version` as the real server does, then dies at load saying why.
DIES_AT_LOAD = (
    '#!/bin/sh\n[ "$1" = --version ] && exec {server} --version\n'
    "echo 'error: cannot open the weights' >&2\nexit 3\n"
)


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Check name -> its line (the summary line is left out)."""
    found: dict[str, str] = {}
    for row in result.stdout.splitlines():
        parts = row.split(None, 1)
        if len(parts) == 2 and parts[0] in ("ok", "warn", "FAIL"):
            name = next(n for n in CHECKS + OTHER_CHECKS if parts[1].startswith(n + " "))
            found[name] = row
    return found


def doctor_json(ws: Workspace, *args: str) -> dict[str, Any]:
    result = ws.loader("doctor", "--json", *args)
    document: dict[str, Any] = json.loads(result.stdout)
    assert result.returncode == (0 if document["ok"] else 1)
    return document


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in document["checks"]}


@pytest.fixture
def stranger(ws: Workspace) -> Iterator[subprocess.Popen[bytes]]:
    """A program that is not imageworks listening on the workspace's proxy and model ports."""
    code = (
        "import socket, sys, time\n"
        "socks = [socket.create_server(('127.0.0.1', int(p))) for p in sys.argv[1:]]\n"
        "print('listening', flush=True)\n"
        "time.sleep(600)\n"
    )
    ports = [str(ws.proxy_port), str(ws.model_port)]
    process = child_processes.popen([sys.executable, "-c", code, *ports], stdout=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline() == b"listening\n"
    yield process
    process.kill()
    process.wait()
    process.wait()


def test_doctor_on_the_demo_registry_is_all_ok_and_the_model_answered(ws: Workspace) -> None:
    with FakeOllama() as ollama:
        ws.extra_env["IMAGEWORKS_OLLAMA_HOST"] = ollama.url
        started = time.monotonic()
        result = ws.loader("doctor")
        took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    found = lines(result)
    assert list(found) == CHECKS
    assert all(row.startswith("ok ") for row in found.values()), result.stdout
    assert f"{SMOL} loaded in " in found["model"]
    assert "answered one token" in found["model"]
    assert "stopped again" in found["model"]
    assert f"Ollama 0.12.0 at {ollama.url}" in found["ollama"]
    assert result.stdout.splitlines()[-1].startswith("everything is ok (7 checks in ")
    assert result.stderr == ""
    # Nothing left behind: no model server, no record of one.
    assert processes_listening_on(ws.model_port) == []
    assert not (ws.root / "_staging" / "active_vllm.json").exists()
    assert took < 60  # a few seconds on an idle machine; generous for a loaded CI runner


def test_doctor_json_is_one_document_with_the_same_checks(ws: Workspace) -> None:
    document = doctor_json(ws)  # Ollama (http://127.0.0.1:9) does not answer: a warning
    assert document["ok"] is True
    assert isinstance(document["seconds"], float)
    assert [check["name"] for check in document["checks"]] == CHECKS
    for check in document["checks"]:
        assert {"name", "status", "found", "fix"} <= check.keys()
        assert check["status"] in ("ok", "warn", "FAIL")
    checks = by_name(document)
    assert checks["ollama"]["status"] == "warn"
    assert checks["ollama"]["url"] == "http://127.0.0.1:9"
    assert "IMAGEWORKS_OLLAMA_HOST" in checks["ollama"]["fix"]
    assert checks["llama-server"]["status"] == "ok"
    assert Path(checks["llama-server"]["path"]).name == "llama-server"
    assert checks["model"]["status"] == "ok"
    assert checks["model"]["port"] == ws.model_port


def test_doctor_fails_naming_the_variable_when_the_llama_server_binary_is_not_executable(
    ws: Workspace,
) -> None:
    binary = ws.root / "llama-server"
    binary.write_text("not a program\n")  # no execute bit
    ws.extra_env["CHAT_PROXY_LLAMA_SERVER_BINARY"] = str(binary)
    result = ws.loader("doctor")
    assert result.returncode == 1
    row = lines(result)["llama-server"]
    assert row.startswith("FAIL ")
    assert f"CHAT_PROXY_LLAMA_SERVER_BINARY={binary} is not an executable file" in row
    assert row.endswith("or unset it")
    assert lines(result)["model"].startswith("warn ")  # not tried without a server


def test_doctor_fails_naming_the_variable_when_the_llama_server_binary_exits_1(
    ws: Workspace,
) -> None:
    serve_through(ws, "#!/bin/sh\necho 'this build is broken' >&2\nexit 1\n")
    result = ws.loader("doctor")
    assert result.returncode == 1
    row = lines(result)["llama-server"]
    assert row.startswith("FAIL ")
    assert "CHAT_PROXY_LLAMA_SERVER_BINARY=" in row
    assert "`--version` exited with code 1: this build is broken" in row
    assert "point CHAT_PROXY_LLAMA_SERVER_BINARY at a working llama-server" in row


def test_doctor_says_how_to_install_llama_cpp_python_when_it_is_the_launcher(
    ws: Workspace,
) -> None:
    ws.extra_env["CHAT_PROXY_LLAMACPP_LAUNCHER"] = "llama-cpp-python"  # not installed here
    result = ws.loader("doctor")
    assert result.returncode == 1
    found = lines(result)
    assert "llama-server" not in found  # not the launcher in use
    row = found["llama-cpp-py"]
    assert row.startswith("FAIL ")
    assert "No module named 'llama_cpp'" in row
    assert "install it with `uv sync --group llama-cpp-python`" in row
    assert found["model"].startswith("warn ")


def test_doctor_names_a_setting_it_cannot_use(ws: Workspace) -> None:
    ws.extra_env["CHAT_PROXY_PORT"] = "eighty"
    result = ws.loader("doctor")
    assert result.returncode == 1
    found = lines(result)
    assert list(found) == ["registry", "settings"]
    assert found["settings"].startswith("FAIL  settings      CHAT_PROXY_PORT: ")
    assert found["settings"].endswith("correct that variable or unset it")


def test_doctor_names_the_pid_and_command_holding_the_proxy_and_model_ports(
    ws: Workspace, stranger: subprocess.Popen[bytes]
) -> None:
    result = ws.loader("doctor")
    assert result.returncode == 1
    found = lines(result)
    ports = (("proxy port", "CHAT_PROXY_PORT"), ("model port", "CHAT_PROXY_VLLM_PORT"))
    for name, variable in ports:
        assert found[name].startswith("FAIL ")
        assert f"in use by pid {stranger.pid} ({sys.executable} -c " in found[name]
        assert f"set {variable} to a free port" in found[name]
    assert found["model"].startswith("warn ")
    assert f"not tried: port {ws.model_port} is taken (by pid {stranger.pid})" in found["model"]


def test_doctor_asks_the_model_through_a_running_proxy(ws: Workspace) -> None:
    with ws.serving() as proxy:
        result = ws.loader("doctor")
        overview = httpx.get(f"{proxy.url}/v1/admin/overview", timeout=10).json()
    assert result.returncode == 0, result.stdout
    found = lines(result)
    assert f"a chat proxy answers at {proxy.url} (pid {proxy.process.pid})" in found["proxy port"]
    assert f"{SMOL} answered one token through the proxy at {proxy.url}" in found["model"]
    # The proxy served it: its request log has the one-token request, its slot the model.
    assert [(r["model"], r["status"]) for r in overview["requests"]["recent"]] == [
        ("smollm2_135m_(Q4_1)", 200)
    ]
    assert overview["slot"]["holder"] == "smollm2_135m_(Q4_1)"


def test_doctor_names_how_a_model_server_died_at_load_and_its_log(ws: Workspace) -> None:
    real = find_llama_server(None).binary
    assert real is not None, "llama-server is part of the demo dependencies"
    serve_through(ws, DIES_AT_LOAD.format(server=real))
    result = ws.loader("doctor")
    assert result.returncode == 1
    assert lines(result)["llama-server"].startswith("ok ")
    rows = result.stdout.splitlines()
    model = next(i for i, row in enumerate(rows) if row.startswith("FAIL  model"))
    log = "logs/llamacpp/smollm2_135m_Q4_1.log"
    assert "could not be started" in rows[model]
    assert "exited with code 3" in rows[model]  # at once, or while starting
    assert f"(log: {log})" in rows[model]
    tail = rows[model + 1 : -1]  # its last log lines, indented, before the summary
    assert tail
    assert all(row.startswith("      ") for row in tail)
    assert any("error: cannot open the weights" in row for row in tail)
    assert processes_listening_on(ws.model_port) == []


def test_doctor_fails_naming_a_broken_registry_file_and_checks_the_rest(ws: Workspace) -> None:
    curated = ws.root / "configs" / "model_registry.curated.json"
    curated.write_text('[{"name": "x",\n')
    result = ws.loader("doctor")
    assert result.returncode == 1
    found = lines(result)
    assert found["registry"].startswith("FAIL ")
    assert f"{Path('configs') / curated.name}:2:1: invalid JSON" in found["registry"]
    assert found["registry"].endswith("correct that file, then retry")
    assert found["llama-server"].startswith("ok ")
    assert found["model"].startswith("warn ")


def test_doctor_with_an_unknown_model_is_the_loaders_one_line_error(ws: Workspace) -> None:
    result = ws.loader("doctor", "--model", "lama", "--json")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("imageworks-loader: error: no model named 'lama'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_doctor_says_when_llama_server_starts_in_safe_mode_here(ws: Workspace) -> None:
    """A binary that crashed at load before (remembered in the user's cache) is named as one
    that starts in safe mode, with why."""
    real = find_llama_server(None).binary
    assert real is not None, "llama-server is part of the demo dependencies"
    memory = SafeModeMemory(ws.root / "cache" / "imageworks" / "safe-mode.json")
    spec = LaunchSpec("llama-server", (str(real),), 0, ws.root / "x.log", safe_mode_args=(SAFE,))
    memory.remember(spec, "smol: was killed by SIGSEGV while starting")
    ws.extra_env["XDG_CACHE_HOME"] = str(ws.root / "cache")

    found = lines(ws.loader("doctor"))

    assert found["llama-server"].startswith("ok ")
    assert f"starts in safe mode ({SAFE}) since " in found["llama-server"]
    assert "was killed by SIGSEGV while starting" in found["llama-server"]


def test_doctor_gets_an_answer_from_a_build_that_crashes_unless_in_safe_mode(
    ws: Workspace,
) -> None:
    """The model check starts the model as activate-model does: a crash at load is retried in
    safe mode there too, and the model answers."""
    real = find_llama_server(None).binary
    assert real is not None, "llama-server is part of the demo dependencies"
    launcher = write_crashing_launcher(ws.root, then=real)
    ws.extra_env.update(
        {"CHAT_PROXY_LLAMA_SERVER_BINARY": str(launcher), "XDG_CACHE_HOME": str(ws.root / "c")}
    )

    result = ws.loader("doctor")

    assert result.returncode == 0, result.stdout
    assert lines(result)["model"].startswith("ok ")
    assert processes_listening_on(ws.model_port) == []  # stopped again
