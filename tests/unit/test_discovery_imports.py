"""The gguf package (and numpy under it) is loaded only when `discover` reads a GGUF file."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def test_neither_the_proxy_nor_the_loader_imports_gguf_or_numpy() -> None:
    check = (
        "import sys, imageworks.chat_proxy.app, imageworks.model_loader.cli; "
        "print(sorted(m for m in ('gguf', 'numpy') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=60
    )
    assert loaded.stdout.strip() == "[]"
