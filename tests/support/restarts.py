"""Driving a running proxy's restart: its overview, `POST /v1/admin/restart`, and the wait for
the new program (a new `boot_id`)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from support.proxy_process import RunningProxy


def overview(proxy: RunningProxy) -> dict[str, Any]:
    response = httpx.get(f"{proxy.url}/v1/admin/overview", timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def restart(proxy: RunningProxy) -> None:
    response = httpx.post(f"{proxy.url}/v1/admin/restart", json={}, timeout=10)
    assert response.status_code == 202, response.text
    assert response.json()["restarting"] is True


def wait_for_new_boot(proxy: RunningProxy, old_boot: str, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            seen = overview(proxy)
        except httpx.HTTPError:
            seen = None
        if seen is not None and seen["proxy"]["boot_id"] != old_boot:
            return seen
        assert proxy.process.poll() is None, (proxy.workdir / "proxy.out").read_text()
        time.sleep(0.1)
    raise AssertionError(
        "the proxy did not come back: " + (proxy.workdir / "proxy.out").read_text()
    )
