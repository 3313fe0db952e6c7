"""Debian programs some tests drive (Chromium, docker-compose): found on PATH, else the test
skips, except under CI (`IMAGEWORKS_TEST_REQUIRE_TOOLS=1`, set by `.ci/run`), where it fails."""

from __future__ import annotations

import os
import shutil

import pytest


def require_program(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
    if os.environ.get("IMAGEWORKS_TEST_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)
