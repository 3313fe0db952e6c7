"""The doctor's port checks: the proxy's port (CHAT_PROXY_HOST/PORT) and the managed model port
(CHAT_PROXY_VLLM_PORT) are free, or whose they are: a running chat proxy (its `/v1/health`
answers), the model server the state file records, or a stranger (its pid and command)."""

from __future__ import annotations

import errno
import shlex
import socket
from dataclasses import dataclass

from imageworks.backends.procfs import PortOwner, group_members, port_owner
from imageworks.backends.state import ManagedState, StateFile
from imageworks.chat_proxy.config import ProxySettings
from imageworks.model_loader.activation import current, proxy_url
from imageworks.model_loader.doctor_report import Finding, Status, fail, ok
from imageworks.model_loader.errors import LoaderError

_MODEL_HOST = "127.0.0.1"  # where managed model servers listen (llamacpp.py, vllm.py)


@dataclass(frozen=True, slots=True)
class ModelPort:
    """The managed model port as the doctor found it."""

    free: bool
    recorded: ManagedState | None  # the live model server the state file records there
    holder: str | None = None  # who else holds it, in words


def proxy_port(proxy: ProxySettings) -> tuple[Finding, str | None]:
    """The finding, and the URL of the chat proxy answering there (None: none does). A proxy
    that refuses the loader's key is a failure whose details say `refused`."""
    address = f"{proxy.host}:{proxy.port}"
    try:
        url = proxy_url(proxy)
    except LoaderError as exc:
        return fail("proxy port", f"{address}: {exc.problem}", exc.fix, refused=True), None
    owner = port_owner(proxy.port)
    if url is not None:
        pid = f" (pid {owner.pid})" if owner is not None else ""
        details = {"url": url, "pid": owner.pid if owner else None}
        return ok("proxy port", f"{address}: a chat proxy answers at {url}{pid}", **details), url
    return free_or_taken("proxy port", proxy.host, proxy.port, owner, "CHAT_PROXY_PORT"), None


def model_port(proxy: ProxySettings) -> tuple[Finding, ModelPort]:
    port = proxy.vllm_port
    address = f"{_MODEL_HOST}:{port}"
    try:
        recorded = current(StateFile(proxy.vllm_state_path))
    except LoaderError as exc:
        finding = fail("model port", f"{address}: {exc.problem}", exc.fix)
        return finding, ModelPort(False, None, "its state file cannot be read")
    owner = port_owner(port)
    if recorded is not None and (owner is None or owner.pid in group_members(recorded.pid)):
        found = (
            f"{address}: {recorded.entry} (pid {recorded.pid}, {recorded.phase}, started by "
            f"the {recorded.owner}), the model server {proxy.vllm_state_path} records"
        )
        finding = ok("model port", found, pid=recorded.pid, entry=recorded.entry)
        return finding, ModelPort(False, recorded)
    finding = free_or_taken("model port", _MODEL_HOST, port, owner, "CHAT_PROXY_VLLM_PORT")
    if finding.status is Status.OK:
        return finding, ModelPort(True, None)
    holder = f"by pid {owner.pid}" if owner is not None else "see the model port line"
    return finding, ModelPort(False, None, holder)


def free_or_taken(
    name: str, host: str, port: int, owner: PortOwner | None, variable: str
) -> Finding:
    address = f"{host}:{port}"
    move = f"stop it, or set {variable} to a free port"
    if owner is not None:
        command = shlex.join(owner.command) or "command unknown"
        found = f"{address} is in use by pid {owner.pid} ({command}), not by imageworks"
        return fail(name, found, move, pid=owner.pid, command=owner.command)
    problem = bind_problem(host, port)
    if problem is None:
        return ok(name, f"{address} is free")
    if problem == errno.EADDRINUSE:
        return fail(name, f"{address} is in use by a process this user cannot see", move)
    if problem == errno.EACCES:
        return fail(name, f"{address}: permission denied", f"set {variable} to 1024 or above")
    return fail(
        name,
        f"{address}: {host} is not an address of this machine ({errno.errorcode.get(problem)})",
        "set CHAT_PROXY_HOST to one of its addresses (127.0.0.1, or 0.0.0.0 for all)",
    )


def bind_problem(host: str, port: int) -> int | None:
    """The errno of listening on host:port (EADDRINUSE: taken), None if it could listen."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    family, _, _, _, address = infos[0]
    try:
        # SO_REUSEADDR (create_server's default), as uvicorn and llama-server listen: a closed
        # connection's TIME_WAIT does not stop them, so it does not count here.
        with socket.create_server(address[:2], family=family):
            return None
    except OSError as exc:
        return exc.errno or errno.EADDRINUSE
