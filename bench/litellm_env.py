"""Where LiteLLM's proxy comes from, how it is configured, and the environment it runs in.

LiteLLM lives in its own small project, bench/litellm/ (pyproject.toml + uv.lock), installed
with `uv sync --project bench/litellm --locked` into bench/litellm/.venv: its pins cannot join
the main lock without moving this project's own dependencies (bench/README.md says why). The
harness runs that environment's `litellm` executable directly (not through `uv run`, whose own
process would be counted in the server's memory). BENCH_LITELLM names another executable.

The config points model `bench echo` at the bench upstream as an OpenAI-compatible `openai/echo`
with `api_base`; one worker, no database, no telemetry, quiet logs, and the model cost map read
from the package (LITELLM_LOCAL_MODEL_COST_MAP) so nothing reaches for the network at start.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parent / "litellm"
EXECUTABLE = PROJECT / ".venv" / "bin" / "litellm"
INSTALL = "uv sync --project bench/litellm --locked"


@dataclass(frozen=True)
class Found:
    argv: list[str]
    version: str


def find() -> Found | str:
    """The LiteLLM proxy to run, or the note that says why there is none."""
    chosen = os.environ.get("BENCH_LITELLM")
    executable = Path(chosen) if chosen else EXECUTABLE
    if not os.access(executable, os.X_OK):
        where = f"BENCH_LITELLM={chosen} is not executable" if chosen else "not installed"
        return f"skipped: {where}; install with `{INSTALL}`"
    python = executable.parent / "python"
    try:
        version = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"skipped: {executable} is there but its litellm cannot be imported ({exc})"
    return Found([str(executable)], version)


def write_config(path: Path, upstream_url: str, extra_models: int = 0) -> Path:
    """config.yaml (JSON is valid YAML) for `bench echo` plus `extra_models` filler models on
    the same upstream, for a listing of the same size as the proxy's."""

    def model(name: str, served: str) -> dict[str, object]:
        params = {"model": f"openai/{served}", "api_base": f"{upstream_url}/v1", "api_key": "none"}
        return {"model_name": name, "litellm_params": params}

    models = [model("bench echo", "echo")]
    models += [
        model(f"bench filler {number:03d}", f"filler-{number:03d}")
        for number in range(1, extra_models + 1)
    ]
    config = {
        "model_list": models,
        "litellm_settings": {
            "drop_params": True,
            "telemetry": False,
            "set_verbose": False,
            "json_logs": False,
            "turn_off_message_logging": True,
        },
        "general_settings": {
            "disable_spend_logs": True,
            "disable_reset_budget": True,
            # no auth, as this proxy on loopback: LiteLLM refuses to start keyless otherwise
            "dangerously_permit_weak_or_unset_master_key": True,
        },
    }
    path.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return path


def environment(workdir: Path) -> dict[str, str]:
    """No database, no network at start, quiet logs, nothing read from a .env file."""
    keep = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    return {
        **keep,
        "HOME": str(workdir),  # any cache it writes stays in the temp dir
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "LITELLM_MODE": "PRODUCTION",
        "LITELLM_TELEMETRY": "False",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
