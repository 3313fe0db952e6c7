"""Who listens on a TCP port, read from /proc (the facts behind a "port is taken by ..." 503)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageworks.backends.procfs import PortOwner, port_owner
from support.child_processes import popen
from support.proxy_process import free_port

pytestmark = pytest.mark.timeout(30)


def own_command() -> list[str]:
    return [os.fsdecode(arg) for arg in Path("/proc/self/cmdline").read_bytes().split(b"\0")[:-1]]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_port_owner_finds_a_socket_listening_in_this_process(listener: socket.socket) -> None:
    owner = port_owner(listener.getsockname()[1])
    assert owner == PortOwner(os.getpid(), own_command())
    assert owner.command[len(owner.command) - len(sys.argv) + 1 :] == sys.argv[1:]


def test_port_owner_finds_an_ipv6_listener() -> None:
    try:
        sock = socket.socket(socket.AF_INET6)
        sock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with sock:
        sock.listen()
        owner = port_owner(sock.getsockname()[1])
    assert owner is not None
    assert owner.pid == os.getpid()


def test_port_owner_names_the_pid_and_command_of_another_process() -> None:
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    child = popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while (owner := port_owner(port)) is None:
            assert child.poll() is None, "http.server exited"
            assert time.monotonic() < deadline, "http.server never listened"
            time.sleep(0.05)
        assert owner == PortOwner(child.pid, command)
    finally:
        child.kill()
        child.wait(timeout=10)


def test_port_owner_of_a_free_port_is_none() -> None:
    assert port_owner(free_port()) is None


def test_port_owner_ignores_connected_sockets(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        accepted, _ = listener.accept()
        with accepted:
            listener.close()  # the accepted connection keeps local port `port`, not listening
            assert port_owner(port) is None
            assert port_owner(client.getsockname()[1]) is None
