"""What a model swap costs on the demo models, beside llama-server's own cold start.

    uv run --locked python bench/swap.py [--rounds 5]

Both demo models (`smollm2 135m (Q4 1)`, `gemma3 270m (Q4 K M)`) are prepared in a temp
workspace by `python -m imageworks.demo`, like the tests do. Each round measures, per model:

- cold start direct: `llama-server` spawned by this script with the argv the proxy would use
  for the entry (built by `launch_settings` + `launch_spec` from the registry, only the port
  differs), timed from spawn to the first 200 on `/health` (polled every 10 ms), then to the
  first streamed content token of a chat completion (`max_tokens` 8) sent straight to it; then
  SIGTERM and wait (the stop time is shown too).
- swap through the proxy: the real `imageworks-chat-proxy` (own process, Ollama pointed at a
  dead port) holds the other model; a streamed request for this one is timed from sending to
  its first content token (drain + stop old + start new + first token). The slot's history in
  `GET /v1/admin/status` (wall-clock `stopping` / `stopped` / `starting` / `ready` events) splits
  it into stop (stopping -> stopped), start (starting -> ready: spawn to the proxy's own health
  check, polled every 50 ms), first token (ready -> token at the client) and other (request
  in -> stop decided, stopped -> starting). A second request for the same model right after is
  the warm first token.

Direct starts and swaps are interleaved within each round, so both see the same machine load
(the proxy's idle model stays loaded meanwhile). Every request sends the same body (the smollm2
entry's system prompt, temperature 0), so the proxy adds no entry defaults and both paths
process the same prompt. At the end the proxy gets SIGTERM and the process table is checked for
a model server left on either port. Prints median and max in milliseconds; the machine's load
average is printed too, since other work on the CPU shows up directly in these numbers.

`python -m bench` runs the same measurement once per round (`prepare`, `one_round`,
`overheads`, called from bench/swap_part.py) on its own proxy, and reports the overhead: the
first token after a switch minus the new model's spawn-to-first-token when started directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import make_demo_workspace
from imageworks.backends.router import launch_spec
from imageworks.backends.supervisor import LaunchSpec
from imageworks.chat_proxy.config import ProxySettings
from imageworks.chat_proxy.launching import launch_settings, safe_mode_memory
from imageworks.registry.schema import RegistryEntry
from imageworks.registry.store import RegistryStore
from support.proxy_process import (
    RunningProxy,
    Workspace,
    free_port,
    pid_alive,
    processes_listening_on,
)

MODELS = {"smol": "smollm2 135m (Q4 1)", "gemma": "gemma3 270m (Q4 K M)"}
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "ping"},
]
MAX_TOKENS = 8
START_DEADLINE_S = 60.0
HEALTH_POLL_S = 0.01
REQUEST_TIMEOUT = httpx.Timeout(60.0, connect=5.0)


@dataclass
class Samples:
    """Millisecond timings by key, e.g. ("direct", "smol", "health")."""

    values: dict[tuple[str, ...], list[float]] = field(default_factory=dict)

    def add(self, key: tuple[str, ...], ms: float) -> None:
        self.values.setdefault(key, []).append(ms)

    def median(self, *key: str) -> float:
        return statistics.median(self.values[key])

    def row(self, label: str, *key: str) -> str:
        data = self.values.get(key, [])
        if not data:
            return f"  {label:<40} {'-':>6} {'-':>6}"
        return f"  {label:<40} {statistics.median(data):6.0f} {max(data):6.0f}"


def http_client() -> httpx.Client:
    # trust_env=False: an HTTP(S)_PROXY must not capture loopback; TCP_NODELAY as in overhead.py.
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    transport = httpx.HTTPTransport(socket_options=nodelay)
    return httpx.Client(timeout=REQUEST_TIMEOUT, transport=transport, trust_env=False)


def first_token(client: httpx.Client, url: str, model: str) -> float:
    """Send a streamed chat completion; perf_counter() when the first content token arrived.
    The rest of the stream is read (at most MAX_TOKENS tokens) so the request ends cleanly."""
    body = {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    seen: float | None = None
    headers = {"Authorization": "Bearer EMPTY"}
    with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{url} {model}: HTTP {response.status_code}: {response.text}")
        for line in response.iter_lines():
            if seen is not None or not line.startswith("data:"):
                continue  # `: loading` comments, blank separators, or already timed
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{url} {model}: error event: {event['error']}")
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    seen = time.perf_counter()
    if seen is None:
        raise RuntimeError(f"{url} {model}: the stream carried no content token")
    return seen


def direct_spec(entry: RegistryEntry, registry: Path, port: int, log_dir: Path) -> LaunchSpec:
    """The LaunchSpec the proxy would build for `entry`, on `port`."""
    settings = ProxySettings(vllm_port=port, backend_log_dir=log_dir)
    return launch_spec(entry, launch_settings(settings, registry))


def as_started_here(spec: LaunchSpec) -> LaunchSpec:
    """`spec` as the proxy starts it on this machine: in safe mode when its binary crashed at
    load here before (backends/safe_mode.py), so the direct start is the same program."""
    memory = safe_mode_memory(ProxySettings())
    return spec.in_safe_mode() if memory.recall(spec) is not None else spec


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM its process group (it runs in a session of its own), wait; SIGKILL if stuck."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def cold_start(
    client: httpx.Client, spec: LaunchSpec, served_id: str, key: str, out: Samples
) -> None:
    """Spawn llama-server as the proxy would, time /health and the first token, stop it."""
    base = f"http://{spec.host}:{spec.port}"
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with spec.log_path.open("ab") as log:
        began = time.perf_counter()
        process = subprocess.Popen(
            spec.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **spec.env},
            cwd=spec.cwd,
        )
    try:
        deadline = began + START_DEADLINE_S
        while True:
            try:
                if client.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"{spec.name} did not become healthy (log: {spec.log_path})")
            time.sleep(HEALTH_POLL_S)
        healthy = time.perf_counter()
        token = first_token(client, f"{base}/v1/chat/completions", served_id)
        out.add(("direct", key, "health"), (healthy - began) * 1000)
        out.add(("direct", key, "token"), (token - began) * 1000)
    finally:
        stopping = time.perf_counter()
        stop_process(process)
        out.add(("direct", key, "stop"), (time.perf_counter() - stopping) * 1000)


def slot_status(client: httpx.Client, proxy_url: str) -> dict[str, Any]:
    response = client.get(f"{proxy_url}/v1/admin/status", timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def event_at(history: list[dict[str, Any]], event: str, model: str, after: float) -> float | None:
    for item in history:
        if item["event"] == event and item["model"] == model and item["at"] >= after:
            return float(item["at"])
    return None


def swap(
    client: httpx.Client,
    proxy_url: str,
    old: RegistryEntry,
    new: RegistryEntry,
    label: str,
    out: Samples,
) -> None:
    """A request for `new` while `old` holds the slot, split by the slot's history."""
    wall_sent = time.time()
    sent = time.perf_counter()
    token = first_token(client, f"{proxy_url}/v1/chat/completions", new.display_name)
    total = (token - sent) * 1000
    wall_token = wall_sent + (token - sent)
    status = slot_status(client, proxy_url)["slot"]
    history = status["history"]
    if status["holder"] != new.name:
        raise RuntimeError(f"{label}: the slot holds {status['holder']}, not {new.name}")

    def at(event: str, model: str, after: float) -> float:
        found = event_at(history, event, model, after)
        if found is None:
            raise RuntimeError(f"{label}: no {event!r} for {model} in the history: {history[-6:]}")
        return found

    stopping = at("stopping", old.name, wall_sent - 0.001)
    stopped = at("stopped", old.name, stopping)
    starting = at("starting", new.name, stopped)
    ready = at("ready", new.name, starting)
    stop_ms, start_ms = (stopped - stopping) * 1000, (ready - starting) * 1000
    after_ready_ms = (wall_token - ready) * 1000
    out.add(("swap", label, "total"), total)
    out.add(("swap", label, "stop"), stop_ms)
    out.add(("swap", label, "start"), start_ms)
    out.add(("swap", label, "token"), after_ready_ms)
    out.add(("swap", label, "other"), total - stop_ms - start_ms - after_ready_ms)


def warm(client: httpx.Client, proxy_url: str, entry: RegistryEntry, out: Samples) -> None:
    sent = time.perf_counter()
    token = first_token(client, f"{proxy_url}/v1/chat/completions", entry.display_name)
    out.add(("warm", entry_key(entry), "token"), (token - sent) * 1000)


def entry_key(entry: RegistryEntry) -> str:
    return next(key for key, name in MODELS.items() if name == entry.display_name)


@contextlib.contextmanager
def proxy_running(workspace: Workspace) -> Iterator[RunningProxy]:
    proxy = workspace.start_proxy()
    try:
        yield proxy
    finally:
        if proxy.process.poll() is None:
            proxy.terminate()


def same_argv_but_port(direct: tuple[str, ...], proxied: list[str]) -> bool:
    def without_port(argv: list[str]) -> list[str]:
        index = argv.index("--port")
        return argv[:index] + argv[index + 2 :]

    return without_port(list(direct)) == without_port(proxied)


SWAPS = (("smol->gemma", "gemma"), ("gemma->smol", "smol"))


def report(out: Samples, rounds: int, notes: list[str]) -> None:
    print(f"\n{rounds} rounds, ms{'p50':>37} {'max':>6}")
    print("direct llama-server (spawned here, same argv as the proxy's)")
    for key in MODELS:
        print(out.row(f"{key:<5} spawn -> /health 200", "direct", key, "health"))
        print(out.row(f"{key:<5} spawn -> first token", "direct", key, "token"))
        print(out.row(f"{key:<5} SIGTERM -> exit", "direct", key, "stop"))
    print("through the proxy (request sent -> first content token)")
    for key in MODELS:
        print(out.row(f"{key:<5} warm (same model again)", "warm", key, "token"))
    for label, _ in SWAPS:
        print(out.row(f"swap {label}", "swap", label, "total"))
        print(out.row("  stop    (stopping -> stopped)", "swap", label, "stop"))
        print(out.row("  start   (starting -> ready)", "swap", label, "start"))
        print(out.row("  token   (ready -> first token)", "swap", label, "token"))
        print(out.row("  other   (queue, stopped -> starting)", "swap", label, "other"))
    for note in notes:
        print(f"  {note}")
    parts = []
    for label, new in SWAPS:
        parts.append(
            f"swap {label} p50 {out.median('swap', label, 'total'):.0f} ms "
            f"(stop {out.median('swap', label, 'stop'):.0f} + start "
            f"{out.median('swap', label, 'start'):.0f} + first token "
            f"{out.median('swap', label, 'token'):.0f}) vs cold start "
            f"{out.median('direct', new, 'health'):.0f} ms direct "
            f"({out.median('direct', new, 'token'):.0f} to first token)"
        )
    print("\n" + "; ".join(parts))
    beyond = ", ".join(f"{label} {ms:.0f} ms" for label, ms in overheads(out).items())
    print(f"overhead beyond the model's own cold start (to first token): {beyond}")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Demo:
    """The demo models prepared in a temp root: the registry, both entries, and the launch
    specs for starting each directly (on `direct_port`, with the proxy's argv otherwise)."""

    root: Path
    registry: Path
    smol: RegistryEntry
    gemma: RegistryEntry
    direct_port: int
    specs: dict[str, LaunchSpec]


def prepare(root: Path, extra_entries: Sequence[dict[str, Any]] = ()) -> Demo:
    """`python -m imageworks.demo` into `root`, a workspace at `root/ws` with the demo registry
    (plus `extra_entries`, e.g. filler entries for a listing of realistic size)."""
    models = root / "demo-models"
    subprocess.run(
        [sys.executable, "-m", "imageworks.demo", "--models-dir", str(models)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (root / "ws").mkdir()
    registry = make_demo_workspace(root / "ws", models)
    if extra_entries:
        curated = registry / "model_registry.curated.json"
        entries = json.loads(curated.read_text(encoding="utf-8"))
        curated.write_text(json.dumps([*entries, *extra_entries], indent=1), encoding="utf-8")
    by_name = {entry.display_name: entry for entry in RegistryStore(registry).load().entries}
    smol, gemma = by_name[MODELS["smol"]], by_name[MODELS["gemma"]]
    direct_port = free_port()
    specs = {
        entry.name: direct_spec(entry, registry, direct_port, root / "direct-logs")
        for entry in (smol, gemma)
    }
    return Demo(root, registry, smol, gemma, direct_port, specs)


def one_round(client: httpx.Client, proxy_url: str, demo: Demo, out: Samples) -> bool:
    """Cold starts of both models directly, then both swaps (and a warm request after each)
    through the proxy at `proxy_url`, which must hold smol. True when the proxy started each
    model with the argv of the direct start (but the port)."""
    smol, gemma, specs = demo.smol, demo.gemma, demo.specs
    # The proxy holds smol already: a crash at load (and safe mode) has been seen by now.
    started = {name: as_started_here(spec) for name, spec in specs.items()}
    for entry in (smol, gemma):
        cold_start(client, started[entry.name], entry.upstream_model_id, entry_key(entry), out)
    swap(client, proxy_url, smol, gemma, "smol->gemma", out)
    argv_same = proxy_argv_matches(client, proxy_url, started[gemma.name])
    warm(client, proxy_url, gemma, out)
    swap(client, proxy_url, gemma, smol, "gemma->smol", out)
    argv_same &= proxy_argv_matches(client, proxy_url, started[smol.name])
    warm(client, proxy_url, smol, out)
    return argv_same


def overheads(out: Samples) -> dict[str, float]:
    """What a swap costs beyond the new model's own cold start, by direction (median ms): first
    token after the switch through the proxy minus spawn-to-first-token of that model direct."""
    return {
        label: out.median("swap", label, "total") - out.median("direct", new, "token")
        for label, new in SWAPS
    }


def kill_listening(*ports: int) -> list[int]:
    """SIGKILL every model server started with `--port` one of `ports` (the process table, not
    our memory of what we started); returns their pids."""
    left = [pid for port in ports for pid in processes_listening_on(port)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not 1 <= args.rounds <= 50:
        parser.error("--rounds must be between 1 and 50")
    began, load_before = time.monotonic(), load_average()
    with tempfile.TemporaryDirectory(prefix="swap-bench-") as tmp:
        demo = prepare(Path(tmp))
        # An absolute registry dir, so the proxy builds the same --model paths as we do.
        workspace = Workspace(
            demo.root / "ws", extra_env={"IMAGEWORKS_REGISTRY_DIR": str(demo.registry)}
        )
        out = Samples()
        argv_same = True
        with http_client() as client, proxy_running(workspace) as proxy:
            chat_url = f"{proxy.url}/v1/chat/completions"
            sent = time.perf_counter()
            first_load_ms = (first_token(client, chat_url, demo.smol.display_name) - sent) * 1000
            for _ in range(args.rounds):
                argv_same &= one_round(client, proxy.url, demo, out)
            model_pid = slot_status(client, proxy.url)["slot"]["pid"]
            code = proxy.terminate()
        # a model server of this run that outlived the proxy: reported, then ended
        left = kill_listening(workspace.model_port, demo.direct_port)
    notes = [
        f"proxy first load (empty slot, smol): {first_load_ms:.0f} ms to first token",
        f"direct argv == the proxy's recorded command (but --port): {argv_same}",
        f"after proxy SIGTERM (exit {code}): model pid {model_pid} alive: "
        f"{pid_alive(model_pid)}; processes with --port {workspace.model_port} or "
        f"{demo.direct_port}: {left or 'none'}",
        f"load average before {load_before}, after {load_average()}; "
        f"whole run {time.monotonic() - began:.0f} s",
    ]
    report(out, args.rounds, notes)


def proxy_argv_matches(client: httpx.Client, proxy_url: str, spec: LaunchSpec) -> bool:
    state = slot_status(client, proxy_url)["state_file"]
    return state is not None and same_argv_but_port(spec.argv, state["command"])


if __name__ == "__main__":
    main()
