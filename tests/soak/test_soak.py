"""Soak: eight clients against the real proxy for a while: two real llama.cpp models that share
the one GPU slot (so they swap), and a scripted upstream; streams and whole answers, clients
leaving early on purpose, and now and then an admin stop. Then what every client received is
checked, against the request log line by line and against the slot's history.

Short form in every `pytest` run; longer: `pytest tests/soak --soak-minutes 30`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import make_demo_workspace, read_json, write_json
from imageworks.backends.procfs import port_owner
from soak.checks import (
    Problem,
    brief,
    check_log,
    holder_problems,
    read_request_log,
    report,
    summary,
)
from soak.traffic import Soak
from support.proxy_process import Workspace, processes_listening_on
from support.scripted_upstream import ScriptedUpstream

pytestmark = pytest.mark.soak

SMOL = "smollm2 135m (Q4 1)"
GEMMA = "gemma3 270m (Q4 K M)"
SCRIPTED = "scripted trickle"


def add_scripted_entry(ws: Workspace, upstream: ScriptedUpstream) -> None:
    path = ws.root / "configs" / "model_registry.curated.json"
    scripted = {
        "name": "scripted_trickle",
        "display_name": SCRIPTED,
        "backend": "external",
        "served_model_id": "trickle",
        "backend_config": {"base_url": f"{upstream.url}/v1"},
    }
    write_json(path, [*read_json(path), scripted])


def command_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return "?"


async def test_soak_clients_get_whole_answers_logged_once_and_one_holder_at_a_time(
    tmp_path: Path,
    demo_models: Path,
    soak_seconds: float,
    soak_seed: int,
    soak_summary: Callable[[str], None],
    pytestconfig: pytest.Config,
) -> None:
    make_demo_workspace(tmp_path, demo_models)
    ws = Workspace(
        tmp_path,
        extra_env={
            "CHAT_PROXY_LOG_PROMPTS": "1",  # the prompt's tag ties each log line to its request
            "CHAT_PROXY_STREAM_HEARTBEAT_S": "2",  # streams waiting for a swap get heartbeats
        },
    )
    with ScriptedUpstream() as upstream:
        add_scripted_entry(ws, upstream)
        proxy = ws.start_proxy()
        soak = Soak(proxy.url, ws.model_port, (SMOL, GEMMA, SCRIPTED), soak_seed, soak_seconds)
        try:
            await soak.run()
            returncode = await asyncio.to_thread(proxy.terminate)  # SIGTERM
            left = [f"pid {p}: {command_of(p)}" for p in processes_listening_on(ws.model_port)]
            owner = port_owner(ws.model_port)
        finally:
            if proxy.process.poll() is None:
                proxy.kill()
            ws.kill_model_servers()

    log = check_log(soak.calls, read_request_log(ws.root / "logs" / "chat_proxy.jsonl"))
    failures = [
        Problem.of(
            call.problem,
            f"{call.describe()}: {call.problem}; received {call.shown()}; log "
            + (" | ".join(brief(line) for line in log.by_tag.get(call.tag, [])) or "none"),
        )
        for call in soak.calls
        if call.problem is not None
    ]
    failures += [
        Problem.of(
            f"admin stop: {s.problem}",
            f"admin stop by client {s.client} at +{s.at:.1f}s, took {s.took:.1f}s: {s.problem}",
        )
        for s in soak.stops
        if s.problem is not None
    ]
    shutdown = [Problem.of("a model process is left after SIGTERM", p) for p in left]
    if owner is not None:
        shutdown.append(
            Problem.of(
                "the model port is still listened on after SIGTERM",
                f"port {ws.model_port}: pid {owner.pid}: {' '.join(owner.command)}",
            )
        )
    if returncode not in (0, -signal.SIGTERM):  # uvicorn re-raises the signal once it is done
        shutdown.append(Problem.of(f"the proxy exited with {returncode} on SIGTERM", ""))
    sections = {
        "unexpected failures": failures,
        "truncated or empty answers logged as ok": log.broken_ok,
        "request log lines missing, doubled or disagreeing with the client": log.mismatches,
        "slot holders overlapping": holder_problems(soak.history, soak.began_wall),
        "seen while running": [Problem.of(text.partition("s ")[2], text) for text in soak.problems],
        "after shutdown": shutdown,
    }
    line = summary(soak, log)
    soak_summary(line)
    print(line)
    minutes = float(pytestconfig.getoption("soak_minutes", default=0.0) or 0.0)
    replay = f"pytest tests/soak --soak-seed {soak_seed} --soak-minutes {minutes:g}"
    found = report(sections)
    assert not found, "\n".join([line, f"replay its choices: {replay}", *found])
