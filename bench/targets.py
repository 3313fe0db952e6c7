"""The servers the benchmark compares, each started on loopback as its own process.

- direct: the bench upstream itself (bench/upstream.py), the baseline of every "added" number;
- floor: the thinnest aiohttp pass-through (bench/floor.py);
- proxy: this project's `imageworks-chat-proxy` console script, request log on;
- litellm: LiteLLM's proxy, 1 worker, from its own environment (bench/litellm/), when installed;
- nginx: a C reverse proxy as the reference for "as cheap as a hop gets", when installed.

Every server is started by `Processes` on the CPUs it was placed on and is ready when its health
URL answers 200. A target that cannot run here is `Skipped`, with the reason and how to get it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import litellm_env
from bench.processes import Child, Processes, free_port, http_ok, wait_until
from bench.registry import MODEL

ORDER = ("direct", "floor", "proxy", "litellm", "nginx")
REPO = Path(__file__).resolve().parent.parent
PROXY_SCRIPT = Path(sys.executable).parent / "imageworks-chat-proxy"
CHAT_PATH = "/v1/chat/completions"
START_TIMEOUT_S = 60.0
LITELLM_START_TIMEOUT_S = 120.0


@dataclass
class Running:
    """A target that is serving: where to send requests, which model to ask for, and the process
    tree whose memory is its memory (None for direct: nothing sits between client and upstream).
    """

    name: str
    label: str
    port: int
    model: str
    server: Child | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Skipped:
    name: str
    label: str
    note: str


Target = Running | Skipped


def start_upstream(
    procs: Processes, cpus: frozenset[int], chunks: int, interval_ms: float
) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "bench.upstream", "--port", str(port)]
    argv += ["--chunks", str(chunks), "--chunk-interval-ms", str(interval_ms)]
    child = procs.start("upstream", argv, cpus=cpus, cwd=REPO)
    wait_until(child, http_ok(f"http://127.0.0.1:{port}/health"), START_TIMEOUT_S)
    return Running("direct", "direct (the upstream)", port, "echo", None)


def start_floor(procs: Processes, cpus: frozenset[int], upstream: Running) -> Running:
    port = free_port()
    argv = [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream", upstream.url]
    child = procs.start("floor", argv, cpus=cpus, cwd=REPO)
    wait_until(child, http_ok(f"http://127.0.0.1:{port}/health"), START_TIMEOUT_S)
    return Running("floor", "floor (aiohttp pass-through)", port, MODEL, child)


def proxy_env(registry: Path, workdir: Path, port: int, model_port: int) -> dict[str, str]:
    """The environment the proxy runs in: this checkout's code, the registry, loopback, the
    request log on (in the temp dir), no Ollama to probe, its model port free."""
    inherited = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *([inherited] if inherited else [])]),
        "IMAGEWORKS_REGISTRY_DIR": str(registry),
        "IMAGEWORKS_OLLAMA_HOST": "http://127.0.0.1:9",
        "CHAT_PROXY_HOST": "127.0.0.1",
        "CHAT_PROXY_PORT": str(port),
        "CHAT_PROXY_VLLM_PORT": str(model_port),
        "CHAT_PROXY_INCLUDE_NON_INSTALLED": "1",
        "CHAT_PROXY_LOG_PATH": str(workdir / "chat_proxy.jsonl"),
    }


def start_proxy(
    procs: Processes,
    cpus: frozenset[int] | None,
    registry: Path,
    workdir: Path,
    name: str = "proxy",
    model_port: int | None = None,
) -> Running:
    """The proxy on `registry`, its request log and state in `workdir`; a managed model (the
    demo's) would be started on `model_port`."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    env = proxy_env(registry, workdir, port, model_port or free_port())
    child = procs.start(name, [str(PROXY_SCRIPT)], cpus=cpus, env=env, cwd=workdir)
    wait_until(child, http_ok(f"http://127.0.0.1:{port}/v1/health"), START_TIMEOUT_S)
    return Running(name, "this proxy", port, MODEL, child)


def start_litellm(
    procs: Processes,
    cpus: frozenset[int],
    upstream: Running,
    workdir: Path,
    extra_models: int = 0,
    name: str = "litellm",
) -> Target:
    found = litellm_env.find()
    if isinstance(found, str):
        return Skipped("litellm", "LiteLLM proxy", found)
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = litellm_env.write_config(workdir / "config.yaml", upstream.url, extra_models)
    argv = [*found.argv, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    child = procs.start(name, argv, cpus=cpus, env=litellm_env.environment(workdir), cwd=workdir)
    wait_until(
        child, http_ok(f"http://127.0.0.1:{port}/health/liveliness"), LITELLM_START_TIMEOUT_S
    )
    return Running("litellm", f"LiteLLM {found.version} (1 worker)", port, MODEL, child)


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def nginx_path() -> str | None:
    """BENCH_NGINX when set (a path, or nothing usable to leave nginx out), else nginx on PATH
    or in /usr/sbin (root's PATH has it, others' may not)."""
    chosen = os.environ.get("BENCH_NGINX")
    if chosen is not None:
        return chosen if os.access(chosen, os.X_OK) else None
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def start_nginx(procs: Processes, cpus: frozenset[int], upstream: Running, workdir: Path) -> Target:
    path = nginx_path()
    if path is None:
        note = "skipped: nginx is not installed (apt-get install nginx-light, or BENCH_NGINX)"
        return Skipped("nginx", "nginx", note)
    version = subprocess.run([path, "-v"], capture_output=True, text=True, check=False)
    words = (version.stderr or version.stdout).strip().split(":", 1)[-1].strip()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=workdir, upstream=upstream.port, port=port))
    argv = [path, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")]
    child = procs.start("nginx", argv, cpus=cpus, cwd=workdir)
    wait_until(child, http_ok(f"http://127.0.0.1:{port}/health"), START_TIMEOUT_S)
    return Running("nginx", f"{words} (1 worker)", port, MODEL, child)
