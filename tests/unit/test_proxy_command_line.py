"""`imageworks-chat-proxy`'s flags: each sets one environment variable, bad usage is exit 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imageworks.chat_proxy.app import VERSION
from imageworks.chat_proxy.command_line import environment_from_argv
from imageworks.chat_proxy.config import load_settings
from imageworks.config import RegistrySettings

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("CHAT_PROXY_", "IMAGEWORKS_")):
            monkeypatch.delenv(name)


def parse(*argv: str) -> dict[str, str]:
    return environment_from_argv(argv, version=VERSION)


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one line bad usage prints on stderr (after checking the exit status and stdout)."""
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("imageworks-chat-proxy: error: ")
    assert lines[0].endswith("; see `imageworks-chat-proxy --help`")
    return lines[0]


def test_command_line_without_flags_sets_nothing() -> None:
    assert parse() == {}


@pytest.mark.parametrize(
    ("argv", "variable", "value"),
    [
        (["--host", "0.0.0.0"], "CHAT_PROXY_HOST", "0.0.0.0"),
        (["--port", "8200"], "CHAT_PROXY_PORT", "8200"),
        (["--port=0"], "CHAT_PROXY_PORT", "0"),
        (["--registry-dir", "/srv/configs"], "IMAGEWORKS_REGISTRY_DIR", "/srv/configs"),
        (["--log-level", "debug"], "CHAT_PROXY_LOG_LEVEL", "debug"),
        (["--log-level", "WARNING"], "CHAT_PROXY_LOG_LEVEL", "warning"),
    ],
)
def test_command_line_flag_sets_its_variable(argv: list[str], variable: str, value: str) -> None:
    assert parse(*argv) == {variable: value}


def test_command_line_sets_every_flag_given() -> None:
    argv = ["--host", "::1", "--port", "9", "--registry-dir", "r", "--log-level", "error"]
    assert parse(*argv) == {
        "CHAT_PROXY_HOST": "::1",
        "CHAT_PROXY_PORT": "9",
        "IMAGEWORKS_REGISTRY_DIR": "r",
        "CHAT_PROXY_LOG_LEVEL": "error",
    }


def test_command_line_port_is_written_as_the_number() -> None:
    assert parse("--port", "08200") == {"CHAT_PROXY_PORT": "8200"}


def test_command_line_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHAT_PROXY_PORT", "8100")
    monkeypatch.setenv("CHAT_PROXY_LOG_LEVEL", "debug")
    monkeypatch.setenv("IMAGEWORKS_REGISTRY_DIR", "elsewhere")
    argv = ["--port", "8200", "--registry-dir", "configs", "--log-level", "warning"]
    for variable, value in parse(*argv).items():
        monkeypatch.setenv(variable, value)
    settings = load_settings()
    assert settings.port == 8200
    assert settings.log_level == "warning"
    assert RegistrySettings().registry_dir == Path("configs")


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--port", "abc"], "argument --port: not a port number: 'abc'"),
        (["--port", "70000"], "argument --port: not a port number (0 to 65535): '70000'"),
        (["--port", "-1"], "argument --port: not a port number (0 to 65535): '-1'"),
        (["--port"], "argument --port: expected one argument"),
        (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
        (["--host", ""], "argument --host: must not be empty"),
        (["--registry-dir", " "], "argument --registry-dir: must not be empty"),
        (["--verbose"], "unrecognized arguments: --verbose"),
        (["serve"], "unrecognized arguments: serve"),
    ],
)
def test_command_line_bad_usage_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], problem: str
) -> None:
    assert problem in usage_error(capsys, *argv)


def test_command_line_takes_no_abbreviated_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert "unrecognized arguments: --reg configs" in usage_error(capsys, "--reg", "configs")


def test_command_line_help_names_each_variable_and_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--help")
    assert exited.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("usage: imageworks-chat-proxy ")
    help_text = " ".join(out.split())  # argparse wraps lines where it likes
    for flag, variable, default in [
        ("--host HOST", "CHAT_PROXY_HOST", "127.0.0.1"),
        ("--port N", "CHAT_PROXY_PORT", "8100"),
        ("--registry-dir DIR", "IMAGEWORKS_REGISTRY_DIR", "configs"),
        ("--log-level LEVEL", "CHAT_PROXY_LOG_LEVEL", "info"),
    ]:
        assert flag in help_text
        assert f"(sets {variable}; default: {default})" in help_text


def test_command_line_help_points_to_the_readme_for_every_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        parse("-h")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "README.md (section Configuration) lists every CHAT_PROXY_* " in help_text


def test_command_line_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--version")
    assert exited.value.code == 0
    assert capsys.readouterr() == (f"imageworks-chat-proxy {VERSION}\n", "")
