"""wrk as the load generator: one thread (it gets one core), a Lua script for the request and a
`done()` hook that writes the numbers as JSON to a file.

The script sets the method, body and content type, and `done()` reads wrk's own latency
histogram (`latency:percentile()`, microseconds) and error counters, so nothing is taken from
wrk's human-readable report. No per-response Lua hook is installed: it would put Lua on every
response and make wrk slower than some of what it measures. wrk counts a status >= 400 as an
error; 3xx would pass unnoticed (no target here answers one).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from bench.load import LoadResult, LoadSpec

_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  local out = assert(io.open(os.getenv("BENCH_WRK_OUT"), "w"))
  out:write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
  out:close()
end
"""


def lua_script(spec: LoadSpec) -> str:
    body = spec.body.decode()
    if "]==]" in body:
        raise ValueError("the body cannot be quoted for Lua")
    lines = [f'wrk.method = "{spec.method}"']
    if spec.body:
        lines.append(f"wrk.body = [==[{body}]==]")
        lines.append('wrk.headers["Content-Type"] = "application/json"')
    return "\n".join(lines) + "\n" + _DONE


class Wrk:
    """Runs wrk on `cpus`; `name` says which wrk, for the output."""

    def __init__(self, path: str, version: str, cpus: frozenset[int]) -> None:
        self.path = path
        self.name = version
        self._cpus = cpus

    def run(self, spec: LoadSpec) -> LoadResult:
        with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
            script = Path(tmp) / "request.lua"
            script.write_text(lua_script(spec))
            out = Path(tmp) / "result.json"
            argv = [
                self.path,
                "-t1",
                f"-c{spec.connections}",
                f"-d{max(1, round(spec.duration_s))}s",
                "--timeout",
                "10s",
                "-s",
                str(script),
                spec.url,
            ]
            done = subprocess.run(
                argv,
                env={**os.environ, "BENCH_WRK_OUT": str(out)},
                capture_output=True,
                text=True,
                timeout=spec.duration_s + 60,
                check=False,
                preexec_fn=lambda: os.sched_setaffinity(0, self._cpus),
            )
            if done.returncode != 0 or not out.exists():
                raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
            raw = json.loads(out.read_text())
        detail = {key: int(raw[key]) for key in ("connect", "read", "write", "status", "timeout")}
        return LoadResult(
            generator=self.name,
            connections=spec.connections,
            duration_s=raw["duration_us"] / 1e6,
            requests=int(raw["requests"]),
            p50_ms=raw["p50_us"] / 1000,
            p99_ms=raw["p99_us"] / 1000,
            max_ms=raw["max_us"] / 1000,
            errors=sum(detail.values()),
            error_detail={key: value for key, value in detail.items() if value},
        )
