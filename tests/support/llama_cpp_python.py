"""llama-cpp-python in tests: the real server when the package is installed, else a stand-in.

The package is left out of the default install (its dependency group `llama-cpp-python` is not
a default one; pyproject.toml says why). So:

- tests of our launcher and proxy for it start `python -m llama_cpp.server` as always; where the
  package is absent, `serve_with_llama_cpp_python(ws)` (a proxy) or `server_env()` (a process
  started directly) put `stand_ins/` first on the child's PYTHONPATH, and its `llama_cpp.server`
  answers instead (stand_ins/llama_cpp/server/__main__.py says how it behaves). With the real
  package installed, nothing changes: the real server answers.
- tests of the real server's own behaviour carry `requires_llama_cpp_python`: skipped without it,
  saying so and how to install it. It is optional on purpose, so these skips stay skips under
  IMAGEWORKS_TEST_REQUIRE_TOOLS=1, unlike those of support/tools.py.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from support.proxy_process import Workspace

INSTALLED = importlib.util.find_spec("llama_cpp") is not None
STAND_INS = Path(__file__).resolve().parent / "stand_ins"
NOT_INSTALLED = (
    "llama-cpp-python is not installed (it is left out of the default install): "
    "`uv sync --group llama-cpp-python` to run this against the real server"
)

requires_llama_cpp_python = pytest.mark.skipif(not INSTALLED, reason=NOT_INSTALLED)


def serve_with_llama_cpp_python(ws: Workspace) -> Workspace:
    """Have the proxy of `ws` run llama.cpp entries on the llama-cpp-python launcher."""
    ws.extra_env["CHAT_PROXY_LLAMACPP_LAUNCHER"] = "llama-cpp-python"
    if not INSTALLED:
        ws.stand_ins = (STAND_INS, *ws.stand_ins)
    return ws


def server_env() -> dict[str, str]:
    """What to set over os.environ for `python -m llama_cpp.server` to start a server: nothing
    with the real package, else the stand-in first on PYTHONPATH."""
    if INSTALLED:
        return {}
    inherited = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([str(STAND_INS), *([inherited] if inherited else [])])}
