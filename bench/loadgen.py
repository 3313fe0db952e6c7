"""The Python load generator, for machines without wrk: keep-alive HTTP/1.1 connections on one
event loop (uvloop when installed), as its own process pinned to the client CPUs.

    python -m bench.loadgen --url URL [--method POST --body JSON] --connections N --duration S

Each connection is a raw asyncio protocol that sends its request again as soon as the last
answer is complete (length-delimited or chunked; only the framing is read, never the body), and
records every latency. On one core with uvloop it does well over 10,000 requests/s, several
times what the proxy serves on one core, so it is not what limits the proxy's rows; it can limit
the "direct" row, whose upstream is faster than any Python client (the output says which
generator ran). Prints one JSON object: requests, duration, p50/p99/max, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.http1 import request_bytes, response_end
from bench.load import LoadResult, LoadSpec
from bench.stats import percentile

_CONNECT_ATTEMPTS = 3


class _Connection(asyncio.Protocol):
    def __init__(self, runner: _Runner) -> None:
        self._runner = runner
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._sent = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._send()

    def _send(self) -> None:
        assert self._transport is not None
        self._sent = time.perf_counter_ns()
        self._transport.write(self._runner.request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        found = response_end(self._buffer)
        if found is None:
            return
        now = time.perf_counter_ns()
        end, status = found
        del self._buffer[:end]
        self._runner.record(now - self._sent, status)
        if now < self._runner.deadline_ns:
            self._send()
        else:
            assert self._transport is not None
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if time.perf_counter_ns() < self._runner.deadline_ns:
            self._runner.errors["closed"] = self._runner.errors.get("closed", 0) + 1


class _Runner:
    def __init__(self, spec: LoadSpec) -> None:
        parts = urlsplit(spec.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        self.spec = spec
        self.request = request_bytes(spec.method, self.host, self.port, path, spec.body)
        self.latencies_ns: list[int] = []
        self.errors: dict[str, int] = {}
        self.deadline_ns = 0

    def record(self, latency_ns: int, status: int) -> None:
        self.latencies_ns.append(latency_ns)
        if not 200 <= status < 300:
            key = f"status_{status}"
            self.errors[key] = self.errors.get(key, 0) + 1

    async def _one(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(_CONNECT_ATTEMPTS):  # reconnect after a close, until the deadline
            if time.perf_counter_ns() >= self.deadline_ns:
                return
            try:
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self), self.host, self.port
                )
            except OSError:
                self.errors["connect"] = self.errors.get("connect", 0) + 1
                await asyncio.sleep(0.01)
                continue
            await protocol.closed

    async def run(self) -> dict[str, Any]:
        began = time.perf_counter_ns()
        self.deadline_ns = began + int(self.spec.duration_s * 1e9)
        await asyncio.gather(*(self._one() for _ in range(self.spec.connections)))
        elapsed = (time.perf_counter_ns() - began) / 1e9
        ordered = sorted(self.latencies_ns)
        return {
            "requests": len(ordered),
            "duration_s": elapsed,
            "p50_ms": percentile(ordered, 50) / 1e6 if ordered else 0.0,
            "p99_ms": percentile(ordered, 99) / 1e6 if ordered else 0.0,
            "max_ms": ordered[-1] / 1e6 if ordered else 0.0,
            "errors": self.errors,
        }


class PythonLoadgen:
    """Runs this module as a child process on `cpus`, reads its JSON."""

    name = "python (bench/loadgen.py, asyncio protocol)"

    def __init__(self, cpus: frozenset[int]) -> None:
        self._cpus = cpus
        try:
            import uvloop  # noqa: F401
        except ImportError:
            self.name = "python (bench/loadgen.py, asyncio protocol, no uvloop)"
        else:
            self.name = "python (bench/loadgen.py, asyncio protocol on uvloop)"

    def run(self, spec: LoadSpec) -> LoadResult:
        argv = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--url",
            spec.url,
            "--method",
            spec.method,
            "--body",
            spec.body.decode(),
            "--connections",
            str(spec.connections),
            "--duration",
            str(spec.duration_s),
        ]
        done = subprocess.run(
            argv,
            cwd=Path(__file__).resolve().parent.parent,  # where `bench` is importable
            capture_output=True,
            text=True,
            timeout=spec.duration_s + 60,
            check=False,
            preexec_fn=lambda: os.sched_setaffinity(0, self._cpus),
        )
        if done.returncode != 0:
            raise RuntimeError(f"bench.loadgen failed ({done.returncode}): {done.stderr}")
        raw = json.loads(done.stdout)
        errors: dict[str, int] = raw["errors"]
        return LoadResult(
            generator=self.name,
            connections=spec.connections,
            duration_s=raw["duration_s"],
            requests=raw["requests"],
            p50_ms=raw["p50_ms"],
            p99_ms=raw["p99_ms"],
            max_ms=raw["max_ms"],
            errors=sum(errors.values()),
            error_detail=errors,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default="")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    spec = LoadSpec(args.url, args.method, args.body.encode(), args.connections, args.duration)
    runner = _Runner(spec)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(runner.run())
    else:
        result = uvloop.run(runner.run())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
