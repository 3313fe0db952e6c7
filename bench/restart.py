"""What `POST /v1/admin/restart` costs a user who keeps chatting, on the demo model.

    uv run --locked python bench/restart.py [--rounds 5] [--leave-model-running]

The real `imageworks-chat-proxy` (exec mode, its own process, Ollama pointed at a dead port)
serves `smollm2 135m (Q4 1)` from a temp workspace prepared by `python -m imageworks.demo`.
Two clients chat in a loop, each request on a new connection (non-streaming, `max_tokens` 8),
while the proxy is restarted once per round. Per round:

- restart: from sending the POST to the first `/v1/admin/overview` with a new `boot_id`;
- stall: the longest request of the round (the one that waited through the drain, the exec
  and, unless the model was left running, the model's new start);
- lost: requests that did not get a 200 (a refused or dropped connection counts): must be 0.

Prints median and max in milliseconds and the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import make_demo_workspace
from support.proxy_process import Workspace, processes_listening_on

MODEL = "smollm2 135m (Q4 1)"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8}


def boot_id(url: str) -> str | None:
    try:
        overview = httpx.get(f"{url}/v1/admin/overview", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None
    return str(overview["proxy"]["boot_id"])


class Chatter:
    """Clients chatting until stopped; each request's latency and whether it got a 200."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.latencies_ms: list[float] = []
        self.lost: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._chat) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _chat(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=120, limits=limits, trust_env=False) as client:
            while not self._stop.is_set():
                began = time.perf_counter()
                try:
                    response = client.post(f"{self.url}/v1/chat/completions", json=BODY)
                    if response.status_code != 200:
                        self.lost.append(f"HTTP {response.status_code}")
                except httpx.HTTPError as exc:
                    self.lost.append(type(exc).__name__)
                self.latencies_ms.append((time.perf_counter() - began) * 1000)

    def finish(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--leave-model-running", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="restart-bench-") as tmp:
        root = Path(tmp)
        models = root / "prepared"
        subprocess.run(
            [sys.executable, "-m", "imageworks.demo", "--models-dir", str(models)], check=True
        )
        make_demo_workspace(root, models)
        ws = Workspace(root)
        if args.leave_model_running:
            ws.extra_env["CHAT_PROXY_LEAVE_MODEL_RUNNING"] = "1"
        proxy = ws.start_proxy()
        restarts, stalls, lost = [], [], 0
        try:
            httpx.post(f"{proxy.url}/v1/chat/completions", json=BODY, timeout=120)
            for _ in range(args.rounds):
                chatter = Chatter(proxy.url, clients=2)
                time.sleep(1.0)
                old = boot_id(proxy.url)
                began = time.perf_counter()
                httpx.post(f"{proxy.url}/v1/admin/restart", json={}, timeout=10)
                while boot_id(proxy.url) in (None, old):
                    time.sleep(0.01)
                restarts.append((time.perf_counter() - began) * 1000)
                time.sleep(2.0)
                chatter.finish()
                stalls.append(max(chatter.latencies_ms))
                lost += len(chatter.lost)
        finally:
            proxy.terminate()
        left = processes_listening_on(ws.model_port)
        if args.leave_model_running:  # left for a next proxy by design: not the bench's to keep
            for pid in left:
                os.killpg(pid, signal.SIGTERM)
    print(f"load average: {os.getloadavg()[0]:.2f}; rounds: {args.rounds}")
    mode = "model left running" if args.leave_model_running else "model stopped and restarted"
    print(f"restart by exec, {mode}        median    max (ms)")
    for label, values in (("POST to new boot_id", restarts), ("longest request", stalls)):
        print(f"  {label:<38} {statistics.median(values):6.0f} {max(values):6.0f}")
    expected = " (CHAT_PROXY_LEAVE_MODEL_RUNNING: by design)" if args.leave_model_running else ""
    print(f"  requests lost: {lost}; model servers left after SIGTERM: {left}{expected}")


if __name__ == "__main__":
    main()
