"""Latency the proxy adds: the same requests to a local upstream, direct and through the proxy.

    uv run python bench/overhead.py [--requests 1000]

The proxy runs as its own process (the real `imageworks-chat-proxy` console script), the
upstream is the scripted test upstream. Both paths use one keep-alive client and sequential
requests, so the difference of the medians is the proxy's own cost per request (parsing,
resolution, forwarding, logging). Loopback only; prints p50/p95 in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import write_json
from support.scripted_upstream import ScriptedUpstream

PROXIED_MODEL = "bench echo"


@contextlib.contextmanager
def running_proxy(registry: Path, workdir: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "IMAGEWORKS_REGISTRY_DIR": str(registry),
        "CHAT_PROXY_PORT": str(port),
        "CHAT_PROXY_INCLUDE_NON_INSTALLED": "1",
        "CHAT_PROXY_LOG_PATH": str(workdir / "chat_proxy.jsonl"),
    }
    script = Path(sys.executable).parent / "imageworks-chat-proxy"
    process = subprocess.Popen(
        [str(script)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/v1/health").raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the proxy did not start") from None
                time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


def measure(client: httpx.Client, url: str, model: str, stream: bool, count: int) -> list[float]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    timings = []
    for _ in range(count):
        began = time.perf_counter()
        if stream:
            with client.stream("POST", url, json=body) as response:
                for _ in response.iter_raw():
                    pass
        else:
            client.post(url, json=body).raise_for_status()
        timings.append((time.perf_counter() - began) * 1000)
    return timings


def summary(timings: list[float]) -> str:
    ordered = sorted(timings)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    return f"p50 {statistics.median(ordered):6.2f} ms   p95 {p95:6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ScriptedUpstream() as upstream:
        registry = Path(tmp) / "configs"
        # Clients ask for a display name, the backend serves another id (as in the demo).
        entry = {
            "name": "bench_echo",
            "display_name": "bench echo",
            "backend": "external",
            "served_model_id": "echo",
            "backend_config": {"base_url": f"{upstream.url}/v1"},
        }
        write_json(registry / "model_registry.curated.json", [entry])
        with running_proxy(registry, Path(tmp)) as proxy_base:
            # TCP_NODELAY: without it the sync client's two-part writes meet delayed ACKs and
            # every request costs ~40 ms on both paths, hiding what we want to see.
            nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            transport = httpx.HTTPTransport(socket_options=nodelay)
            with httpx.Client(timeout=30, transport=transport) as client:
                for stream in (False, True):
                    direct_url = f"{upstream.url}/v1/chat/completions"
                    proxy_url = f"{proxy_base}/v1/chat/completions"
                    measure(client, direct_url, "echo", stream, 50)  # warm up both paths
                    measure(client, proxy_url, PROXIED_MODEL, stream, 50)
                    direct = measure(client, direct_url, "echo", stream, args.requests)
                    proxied = measure(client, proxy_url, PROXIED_MODEL, stream, args.requests)
                    added = statistics.median(proxied) - statistics.median(direct)
                    kind = "stream    " if stream else "non-stream"
                    print(f"{kind} direct  {summary(direct)}")
                    print(f"{kind} proxied {summary(proxied)}   added p50 {added:5.2f} ms")


if __name__ == "__main__":
    main()
