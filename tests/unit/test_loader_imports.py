"""`imageworks-loader` starts and stops model servers without the proxy's web stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

WEB_MODULES = ("starlette", "fastapi", "uvicorn", "aiohttp", "imageworks.chat_proxy.services")


def test_loader_imports_none_of_the_proxy_web_wiring() -> None:
    check = (
        "import sys, imageworks.model_loader.cli, imageworks.model_loader.activation; "
        f"print(sorted(m for m in {WEB_MODULES!r} if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == "[]"
