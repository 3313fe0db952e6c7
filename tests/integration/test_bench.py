"""`python -m bench --quick`: the benchmark harness runs end to end and writes the JSON it
promises. Only the structure is checked (every requested target there with numbers, no errors,
the machine described, skipped parts explained), never a speed: these are tests, the numbers
belong to bench runs.

LiteLLM and nginx are hidden from the harness here (BENCH_LITELLM / BENCH_NGINX point at
nothing), so every machine sees the same skipped rows whatever is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from numbers import Real
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

HIDDEN = {"BENCH_LITELLM": "/nonexistent/litellm", "BENCH_NGINX": "/nonexistent/nginx"}
MACHINE_FIELDS = ("cpu_model", "cores_online", "memory_gib", "kernel", "python", "load_generator")


def run_bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out), *args],
        cwd=REPO_ROOT,
        env={**os.environ, **HIDDEN},
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(out.read_text())
    return result, done.stdout


def numeric(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_common(result: dict[str, Any], measured: list[str]) -> None:
    assert result["errors"] == []
    machine = result["machine"]
    for name in MACHINE_FIELDS:
        assert machine[name], name
    assert machine["placement"]
    assert len(result["rounds"]) == 1
    for name in measured:
        assert result["targets"][name]["status"] == "measured"
        cells = result["summary"][name]
        for key in ("c1_p50_ms", "c1_p99_ms", "c32_rps", "c32_p99_ms", "stream_ttft_p50_ms"):
            assert numeric(cells[key]), (name, key, cells.get(key))
        for metric in ("c1", "c32", "stream"):
            assert result["rounds"][0][metric][name]["valid"] is True
    for name in measured:
        if name != "direct":
            for key in ("c1_added_p50_ms", "chunk_added_p50_ms", "chunk_added_p99_ms"):
                assert numeric(result["summary"][name][key]), (name, key)
            assert numeric(result["summary"][name]["rss_idle_mb"])
            assert numeric(result["summary"][name]["rss_growth_pct"])
            assert result["rss"][name]["requests"] > 0
            assert result["rss"][name]["requests_planned"] == 5_000


@pytest.mark.parametrize("loadgen", ["auto", "python"])
def test_quick_run_without_swap(tmp_path: Path, loadgen: str) -> None:
    result, table = run_bench(
        tmp_path, "--skip-swap", "--only", "direct,floor,proxy", "--loadgen", loadgen
    )
    check_common(result, ["direct", "floor", "proxy"])
    assert set(result["targets"]) == {"direct", "floor", "proxy"}
    if loadgen == "python":
        assert result["machine"]["load_generator"].startswith("python")
    assert numeric(result["summary"]["proxy"]["models_p50_ms"])
    assert "models_swap_p50_ms" not in result["summary"]["proxy"]
    assert result["swap_part"]["status"] == "skipped"
    assert set(result["verdicts"]) >= {"c1_added_p50_ms", "c32_rps", "rss_idle_mb"}
    assert all(v in ("pass", "miss") for k, v in result["verdicts"].items() if "swap" not in k)
    assert "target (this proxy)" in table
    assert "floor (aiohttp pass-through)" in table


def test_quick_run_with_swap_and_skipped_targets(tmp_path: Path) -> None:
    result, table = run_bench(tmp_path, "--only", "direct,proxy,litellm,nginx")
    check_common(result, ["direct", "proxy"])
    for name in ("litellm", "nginx"):
        assert result["targets"][name]["status"] == "skipped"
        assert result["targets"][name]["note"].startswith("skipped:")
        assert result["targets"][name]["note"] in table
        assert name not in result["summary"]
    assert result["swap_part"]["status"] == "measured"
    swap = result["rounds"][0]["swap"]["proxy"]
    assert swap["valid"] is True
    assert set(swap["overhead_ms"]) == {"smol->gemma", "gemma->smol"}
    during = result["rounds"][0]["models_swap"]["proxy"]
    assert during["valid"] is True
    assert during["requests_during_swap"] > 0
    for key in ("models_p50_ms", "models_swap_p50_ms", "swap_overhead_ms"):
        assert numeric(result["summary"]["proxy"][key]), key
