"""Shared test helpers: registry directories built from plain JSON."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import child_processes
from support.proxy_process import Workspace

# No process a test starts outlives the run (stopped on SIGTERM/SIGINT and after a SIGKILL too);
# one still running at the end fails the run.
# `--restart-rounds N`: the long form of the restarts under load.
pytest_plugins = ["support.process_hygiene", "support.restart_rounds"]

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).resolve().parent.parent


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def entry(name: str, backend: str = "llamacpp", **fields: Any) -> dict[str, Any]:
    return {"name": name, "backend": backend, **fields}


@pytest.fixture
def registry_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "configs"
    directory.mkdir()
    return directory


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two demo GGUF models, prepared once per test run by the project's own command."""
    models = tmp_path_factory.mktemp("models") / "demo"
    child_processes.run(
        [sys.executable, "-m", "imageworks.demo", "--models-dir", str(models)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return models


def make_demo_workspace(root: Path, demo_models: Path) -> Path:
    """`root/configs`: a copy of the bundled demo registry, whose `../models/demo/...` paths
    find the prepared models. Returns the registry directory."""
    configs = root / "configs"
    configs.mkdir()
    shutil.copy(REPO_ROOT / "configs" / "model_registry.curated.json", configs)
    (root / "models").mkdir()
    (root / "models" / "demo").symlink_to(demo_models)
    return configs


@pytest.fixture
def demo_registry(tmp_path: Path, demo_models: Path) -> Path:
    return make_demo_workspace(tmp_path, demo_models)


@pytest.fixture
def ws(tmp_path: Path, demo_models: Path) -> Iterator[Workspace]:
    """A workspace with the demo registry, for the real console scripts; no proxy it started
    and no model server on its port outlives the test."""
    make_demo_workspace(tmp_path, demo_models)
    workspace = Workspace(tmp_path)
    yield workspace
    workspace.close()
