"""`imageworks-loader` through its real console script, as a user runs it; and its calls to the
proxy's admin endpoints, against a stand-in proxy on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import entry, read_json, write_json
from imageworks.backends.state import StateFile
from imageworks.chat_proxy.app import VERSION
from imageworks.chat_proxy.config import ProxySettings
from imageworks.model_loader.activation import admin_token, proxy_url, via_proxy
from imageworks.model_loader.errors import ActivationError, LoaderError
from support import child_processes
from support.proxy_process import free_port, pid_alive
from support.proxy_server import ProxyServer
from support.scripted_llama_server import write_launcher

LOADER = Path(sys.executable).parent / "imageworks-loader"
LLAMA = "llama_12.2b_(Q4_K_M)"
SERVED = "gguf_1b"  # a llama.cpp entry the tests start on a scripted llama-server


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def run(
    *args: str, registry_dir: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    # Nothing from the developer's own settings (a proxy on :8100, keys) leaks into a test.
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("CHAT_PROXY_", "IMAGEWORKS_"))
    }
    environment = {
        **inherited,
        "IMAGEWORKS_OLLAMA_HOST": _dead_url(),
        "CHAT_PROXY_PORT": _dead_url().rsplit(":", 1)[1],
        **env,
    }
    prefix = ["--registry-dir", str(registry_dir)] if registry_dir else []
    return child_processes.run(
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
    assert lines[0].startswith("imageworks-loader: error: ")
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


def test_version_is_the_proxys_version() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == (f"imageworks-loader {VERSION}\n", "")


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


def test_usage_errors_are_one_line_naming_the_help(registry: Path) -> None:
    line = assert_one_line_error(run("activate-model", registry_dir=registry), code=2)
    assert "--stop" in line
    assert "`imageworks-loader activate-model --help`" in line
    both = run("activate-model", LLAMA, "--stop", registry_dir=registry)
    assert "not allowed" in assert_one_line_error(both, code=2)


def test_unknown_name_is_one_line_that_names_the_list_command(registry: Path) -> None:
    for command in ("show", "lock", "unlock", "verify"):
        line = assert_one_line_error(run(command, "lama", "--json", registry_dir=registry))
        assert "no model named 'lama'" in line
        assert line.endswith("run `imageworks-loader list` to see the names")


def test_json_failures_print_nothing_on_stdout(registry: Path) -> None:
    result = run("show", "lama", "--json", registry_dir=registry)
    assert result.returncode == 1
    assert result.stdout == ""


def test_every_registry_command_prints_one_json_document(registry: Path) -> None:
    documents = {
        command: run(*command, "--json", registry_dir=registry)
        for command in (
            ("list",),
            ("show", LLAMA),
            ("lock", LLAMA),
            ("verify",),
            ("verify", LLAMA),
            ("unlock", LLAMA),
        )
    }
    for command, result in documents.items():
        assert result.returncode == 0, (command, result.stderr)
        json.loads(result.stdout)  # the whole of stdout is one document
    locked = json.loads(documents[("lock", LLAMA)].stdout)
    assert locked["name"] == LLAMA
    assert locked["version_lock"]["locked"] is True
    [verdict] = json.loads(documents[("verify",)].stdout)
    assert verdict["status"] == "ok"
    assert verdict["sha256"] == locked["version_lock"]["expected_aggregate_sha256"]
    assert json.loads(documents[("unlock", LLAMA)].stdout)["version_lock"]["locked"] is False


def test_verify_json_reports_changed_weights_and_fails(registry: Path, weights: Path) -> None:
    run("lock", LLAMA, registry_dir=registry)
    (weights / "config.json").write_text('{"arch": "changed"}')
    result = run("verify", "--json", registry_dir=registry)
    assert [v["status"] for v in json.loads(result.stdout)] == ["changed"]
    line = assert_one_line_error(result)
    assert "`imageworks-loader lock NAME`" in line


# -- the managed port, without a proxy ---------------------------------------------------------


@pytest.fixture
def port_env(tmp_path: Path) -> dict[str, str]:
    """Settings for the model commands: a free model port and a state file of the test's own."""
    return {
        "CHAT_PROXY_VLLM_PORT": str(free_port()),
        "CHAT_PROXY_VLLM_STATE_PATH": str(tmp_path / "_staging" / "active_vllm.json"),
        "CHAT_PROXY_BACKEND_LOG_DIR": str(tmp_path / "logs"),
        "CHAT_PROXY_REQUIRE_TEMPLATE": "0",
        "CHAT_PROXY_LLAMA_SERVER_BINARY": str(write_launcher(tmp_path)),
    }


@pytest.fixture
def served(registry: Path, tmp_path: Path, port_env: dict[str, str]) -> Iterator[Path]:
    """The registry with a llama.cpp entry that starts on the scripted llama-server; whatever a
    test leaves running on the model port is stopped afterwards."""
    model = tmp_path / "gguf_1b.gguf"
    model.write_bytes(b"GGUF")
    write_json(
        registry / "model_registry.discovered.json",
        [entry(SERVED, download_path=str(model), display_name="gguf 1b")],
    )
    yield registry
    record = StateFile(Path(port_env["CHAT_PROXY_VLLM_STATE_PATH"])).read()
    if record is not None and pid_alive(record.pid):
        os.killpg(record.pid, signal.SIGKILL)


def test_current_model_says_plainly_that_nothing_is_active(
    registry: Path, port_env: dict[str, str]
) -> None:
    result = run("current-model", registry_dir=registry, **port_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"No model is active on port {port_env['CHAT_PROXY_VLLM_PORT']}.\n"
    assert result.stderr == ""


def test_current_model_json_prints_null_when_nothing_is_active(
    registry: Path, port_env: dict[str, str]
) -> None:
    result = run("current-model", "--json", registry_dir=registry, **port_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) is None
    stopped = run("activate-model", "--stop", "--json", registry_dir=registry, **port_env)
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout) is None


def test_activate_current_and_stop_in_words_and_in_json(
    served: Path, port_env: dict[str, str]
) -> None:
    port = port_env["CHAT_PROXY_VLLM_PORT"]
    started = run("activate-model", "gguf 1b", "--json", registry_dir=served, **port_env)
    assert started.returncode == 0, started.stderr
    record = json.loads(started.stdout)
    assert (record["entry"], record["port"], record["phase"]) == (SERVED, int(port), "ready")

    shown = run("current-model", registry_dir=served, **port_env)
    assert shown.returncode == 0, shown.stderr
    title, *rows = shown.stdout.splitlines()
    assert title == f"gguf 1b is active on port {port}."
    fields = dict(row.strip().split(None, 1) for row in rows if not row.startswith("  logical"))
    assert fields["backend"] == "llamacpp"
    assert fields["pid"] == str(record["pid"])
    assert fields["phase"] == "ready"
    assert "(up " in fields["since"]
    assert "--port" in fields["command"]
    assert fields["source"].startswith(f"the state file {port_env['CHAT_PROXY_VLLM_STATE_PATH']}")
    assert f"  logical name  {SERVED}" in rows

    assert (
        json.loads(run("current-model", "--json", registry_dir=served, **port_env).stdout) == record
    )

    stopped = run("activate-model", "--stop", registry_dir=served, **port_env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.splitlines() == [
        f"Stopped gguf 1b ({SERVED}, pid {record['pid']}).",
        f"No model is active on port {port}.",
    ]
    assert not pid_alive(record["pid"])


FAILING_SERVER = "#!/bin/sh\necho 'error: this is not a model file' >&2\nexit 3\n"


def test_failed_start_is_one_line_naming_the_log_then_its_tail(
    served: Path, port_env: dict[str, str], tmp_path: Path
) -> None:
    failing = tmp_path / "failing-server"
    failing.write_text(FAILING_SERVER)
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    env = {**port_env, "CHAT_PROXY_LLAMA_SERVER_BINARY": str(failing)}

    result = run("activate-model", SERVED, registry_dir=served, **env)
    assert result.returncode == 1
    first, *tail = result.stderr.splitlines()
    assert first.startswith(f"imageworks-loader: error: {SERVED} could not be started: ")
    assert "(log: " in first
    assert first.endswith("that log says why")
    assert tail
    assert all(line.startswith("    ") for line in tail)
    assert any("this is not a model file" in line for line in tail)

    quiet = run("activate-model", SERVED, "--json", registry_dir=served, **env)
    quiet_line = assert_one_line_error(quiet)  # the same line, without the tail
    assert quiet_line.startswith(f"imageworks-loader: error: {SERVED} could not be started: ")
    assert quiet_line.endswith("that log says why")
    assert quiet.stdout == ""


def test_a_file_in_place_of_the_state_directory_is_one_line(
    registry: Path, port_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "not-a-directory").write_text("")
    env = {**port_env, "CHAT_PROXY_VLLM_STATE_PATH": str(tmp_path / "not-a-directory" / "s.json")}
    for command in (("current-model",), ("activate-model", "--stop", "--json")):
        line = assert_one_line_error(run(*command, registry_dir=registry, **env))
        assert "not-a-directory" in line
        assert line.endswith("check CHAT_PROXY_VLLM_STATE_PATH (its directory must be writable)")


@pytest.mark.timeout(60)
def test_a_held_state_file_lock_is_one_line(registry: Path, port_env: dict[str, str]) -> None:
    state_file = StateFile(Path(port_env["CHAT_PROXY_VLLM_STATE_PATH"]))
    with state_file.locked():  # as a proxy or loader stuck mid-change would (10 s wait)
        result = run("current-model", registry_dir=registry, **port_env)
    line = assert_one_line_error(result)
    assert "lock" in line
    assert "wait for it to finish, then retry" in line


def test_a_bad_proxy_setting_names_the_variable(registry: Path, port_env: dict[str, str]) -> None:
    env = {**port_env, "CHAT_PROXY_VLLM_PORT": "many"}
    line = assert_one_line_error(run("current-model", registry_dir=registry, **env))
    assert line.startswith("imageworks-loader: error: CHAT_PROXY_VLLM_PORT: ")
    assert line.endswith("correct that variable or unset it")


def test_an_ollama_entry_names_the_proxy_as_the_way(
    registry: Path, port_env: dict[str, str]
) -> None:
    line = assert_one_line_error(
        run("activate-model", "phi4_14b", registry_dir=registry, **port_env)
    )
    assert "'ollama'" in line
    assert "`imageworks-chat-proxy`" in line


# -- the managed port, through the real proxy ----------------------------------------------------


@pytest.fixture
def proxy(served: Path, tmp_path: Path, port_env: dict[str, str]) -> Iterator[ProxyServer]:
    settings = {
        "vllm_port": int(port_env["CHAT_PROXY_VLLM_PORT"]),
        "vllm_state_path": Path(port_env["CHAT_PROXY_VLLM_STATE_PATH"]),
        "llama_server_binary": port_env["CHAT_PROXY_LLAMA_SERVER_BINARY"],
        "require_template": False,
    }
    with ProxyServer(served, tmp_path, **settings) as server:
        yield server


@pytest.mark.timeout(120)
def test_activate_and_current_model_through_the_proxy(
    proxy: ProxyServer, served: Path, port_env: dict[str, str]
) -> None:
    env = {**port_env, "CHAT_PROXY_PORT": proxy.url.rsplit(":", 1)[1]}
    port = port_env["CHAT_PROXY_VLLM_PORT"]
    started = run("activate-model", SERVED, registry_dir=served, **env)
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith(f"gguf 1b is active on port {port}.\n")
    assert f"  source        the GPU slot of the proxy at {proxy.url}" in started.stdout

    status = json.loads(run("current-model", "--json", registry_dir=served, **env).stdout)
    assert status["proxy"] == proxy.url
    assert status["slot"]["holder"] == SERVED
    shown = run("current-model", registry_dir=served, **env).stdout
    assert f"  pid           {status['slot']['pid']}\n" in shown
    assert "  backend       llamacpp\n" in shown

    stopped = json.loads(
        run("activate-model", "--stop", "--json", registry_dir=served, **env).stdout
    )
    assert stopped["slot"]["holder"] is None
    assert run("current-model", registry_dir=served, **env).stdout == (
        f"No model is active on port {port} (according to the proxy at {proxy.url}).\n"
    )


# -- the proxy's admin endpoints, with keys ------------------------------------------------------


IDLE_STATUS = {"slot": {"holder": None, "state": "empty"}, "state_file": None}


class StandInProxy:
    """The chat proxy's `/v1/health` and `/v1/admin/*` on loopback (stdlib HTTP server in a
    thread): it records every request (header names in lower case) and answers admin requests
    with `admin_answer` (a 401 when `key` is set and the request does not carry it), or drops
    the connection (`drop_admin`)."""

    def __init__(
        self,
        *,
        key: str | None = None,
        drop_admin: bool = False,
        admin_answer: tuple[int, Any] = (200, IDLE_STATUS),
    ) -> None:
        self.requests: list[dict[str, Any]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                proxy.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                if self.path == "/v1/health":
                    return self._send(200, {"status": "ok", "slot": {"holder": None}})
                if drop_admin:
                    self.close_connection = True
                    return None
                if key is not None and self.headers.get("Authorization") != f"Bearer {key}":
                    return self._send(401, {"error": {"message": "a key is required"}})
                return self._send(*admin_answer)

            def _send(self, status: int, document: Any) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StandInProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def admin_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].startswith("/v1/admin/")]


def settings_for(proxy: StandInProxy, **keys: Any) -> ProxySettings:
    return ProxySettings(port=proxy.port, **keys)


@pytest.mark.timeout(30)
def test_via_proxy_sends_the_admin_key_and_a_json_body_on_posts() -> None:
    with StandInProxy(key="admin-secret") as proxy:
        via_proxy(proxy.url, "POST", "/v1/admin/stop", token="admin-secret")
        via_proxy(proxy.url, "GET", "/v1/admin/status", token="admin-secret")
    post, get = proxy.admin_requests()
    assert post["headers"]["authorization"] == "Bearer admin-secret"
    assert post["headers"]["content-type"] == "application/json"
    assert json.loads(post["body"]) == {}
    assert get["headers"]["authorization"] == "Bearer admin-secret"
    assert get["body"] == b""


@pytest.mark.timeout(30)
def test_via_proxy_sends_the_given_body_as_json() -> None:
    with StandInProxy() as proxy:
        via_proxy(proxy.url, "POST", "/v1/admin/activate", {"model": SERVED})
    [post] = proxy.admin_requests()
    assert post["headers"]["content-type"] == "application/json"
    assert "authorization" not in post["headers"]
    assert json.loads(post["body"]) == {"model": SERVED}


def test_admin_token_prefers_the_admin_key_then_an_api_key() -> None:
    assert admin_token(ProxySettings(admin_key="boss", api_keys="b,a")) == "boss"
    assert admin_token(ProxySettings(api_keys="b,a")) == "a"
    assert admin_token(ProxySettings()) is None


@pytest.mark.timeout(30)
def test_proxy_url_finds_the_proxy_sending_the_key() -> None:
    with StandInProxy() as proxy:
        assert proxy_url(settings_for(proxy, admin_key="boss")) == proxy.url
    [health] = proxy.requests
    assert health["path"] == "/v1/health"
    assert health["headers"]["authorization"] == "Bearer boss"


@pytest.mark.timeout(30)
def test_a_refused_key_says_to_set_the_admin_key() -> None:
    with StandInProxy(key="boss") as proxy, pytest.raises(LoaderError) as refused:
        via_proxy(proxy.url, "POST", "/v1/admin/stop", token="user-key")
    assert str(refused.value).endswith("set CHAT_PROXY_ADMIN_KEY to the proxy's admin key")
    assert "401" in str(refused.value)


@pytest.mark.timeout(60)
def test_current_model_without_the_key_is_one_line_naming_the_variable(registry: Path) -> None:
    with StandInProxy(key="boss") as proxy:
        env = {"CHAT_PROXY_PORT": str(proxy.port)}
        line = assert_one_line_error(run("current-model", registry_dir=registry, **env))
        assert "CHAT_PROXY_ADMIN_KEY" in line
        keyed = run(
            "current-model", "--json", registry_dir=registry, CHAT_PROXY_ADMIN_KEY="boss", **env
        )
        stopped = run(
            "activate-model", "--stop", registry_dir=registry, CHAT_PROXY_API_KEYS="boss", **env
        )
    assert keyed.returncode == 0, keyed.stderr
    assert json.loads(keyed.stdout)["proxy"] == proxy.url
    assert stopped.returncode == 0, stopped.stderr
    stop = proxy.admin_requests()[-1]
    assert (stop["method"], stop["path"]) == ("POST", "/v1/admin/stop")
    assert stop["headers"]["authorization"] == "Bearer boss"
    assert stop["headers"]["content-type"] == "application/json"


@pytest.mark.timeout(60)
def test_a_proxy_that_stops_answering_is_one_line(registry: Path) -> None:
    with StandInProxy(drop_admin=True) as proxy:
        result = run("current-model", registry_dir=registry, CHAT_PROXY_PORT=str(proxy.port))
    line = assert_one_line_error(result)
    assert f"the proxy at {proxy.url} did not answer GET /v1/admin/status" in line
    assert "`imageworks-chat-proxy`" in line


@pytest.mark.timeout(30)
def test_a_failed_start_through_the_proxy_keeps_its_log_tail_off_the_summary() -> None:
    message = (
        f"{SERVED} could not be started: {SERVED}: exited with code 1 while starting "
        "(log: logs/llamacpp/gguf_1b.log)\n--- last log lines ---\nerror: bad magic\nbye"
    )
    failure = (503, {"error": {"message": message, "type": "server_error"}})
    with StandInProxy(admin_answer=failure) as proxy, pytest.raises(ActivationError) as failed:
        via_proxy(proxy.url, "POST", "/v1/admin/activate", {"model": SERVED})
    summary = str(failed.value)
    assert "\n" not in summary
    assert summary.startswith(f"the proxy at {proxy.url} answered HTTP 503: {SERVED} could not")
    assert summary.endswith("(log: logs/llamacpp/gguf_1b.log); that log says why")
    assert failed.value.log_tail == "error: bad magic\nbye"
