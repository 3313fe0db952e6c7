"""A hostile web page in the user's own browser (real headless Chromium) against a real proxy
holding a real model: from another origin it tries to stop the model, swap it through a chat
request, activate another one and read the model list; through DNS rebinding (its own name
resolving to 127.0.0.1) it tries the same from what the browser thinks is its own origin.
Nothing may change, and the refusals must be the proxy's (its log names them), not the
browser's: the same page with its origin trusted does stop the model."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from conftest import make_demo_workspace
from support.browser import chromium
from support.proxy_process import RunningProxy, Workspace, processes_listening_on
from support.threaded_server import ThreadedServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SMOL = "smollm2 135m (Q4 1)"
SMOL_ENTRY = "smollm2_135m_(Q4_1)"
GEMMA = "gemma3 270m (Q4 K M)"

# Every attack a page can make without the proxy's cooperation: "simple" requests that no CORS
# preflight stops (text/plain bodies, a form), a JSON request that needs a preflight, a read.
ATTACKS = """
<!doctype html><title>cute cats</title>
<iframe name="sink" id="sink"></iframe>
<form id="form" target="sink" method="POST" enctype="text/plain" action="PROXY/v1/admin/stop">
  <input name='{"a":"' value='"}'>
</form>
<script>
const proxy = "PROXY";
window.results = {};
async function attempt(name, request) {
  try {
    const response = await request();
    window.results[name] = response.type === "opaque" ? "sent (opaque)" : response.status;
  } catch (error) {
    window.results[name] = "failed: " + error.name;
  }
}
const text = {"Content-Type": "text/plain"};
(async () => {
  await attempt("stop", () => fetch(proxy + "/v1/admin/stop",
    {method: "POST", mode: "no-cors", headers: text, body: "{}"}));
  await attempt("swap by chat", () => fetch(proxy + "/v1/chat/completions",
    {method: "POST", mode: "no-cors", headers: text,
     body: JSON.stringify({model: "GEMMA", max_tokens: 1,
                           messages: [{role: "user", content: "hi"}]})}));
  await attempt("activate", () => fetch(proxy + "/v1/admin/activate",
    {method: "POST", headers: {"Content-Type": "application/json"},
     body: JSON.stringify({model: "GEMMA"})}));
  await attempt("read models", () => fetch(proxy + "/v1/models"));
  document.getElementById("sink").onload = () => { window.done = true; };
  document.getElementById("form").submit();
})();
</script>
"""


@pytest.fixture
def ws(tmp_path: Path, demo_models: Path) -> Iterator[Workspace]:
    make_demo_workspace(tmp_path, demo_models)
    workspace = Workspace(tmp_path)
    yield workspace
    for pid in processes_listening_on(workspace.model_port):
        os.killpg(pid, signal.SIGKILL)


@dataclass
class HostileSite:
    """A web site on another port of the same machine: another origin, as any page is."""

    page: str = ""

    def __post_init__(self) -> None:
        async def serve(request: Request) -> HTMLResponse:
            return HTMLResponse(self.page)

        self.server = ThreadedServer(Starlette(routes=[Route("/", serve)]), "hostile site")
        self.url = self.server.url


@pytest.fixture
def hostile_site() -> Iterator[HostileSite]:
    site = HostileSite()
    site.server.start()
    yield site
    site.server.stop()


def slot(proxy: RunningProxy) -> dict[str, Any]:
    body: dict[str, Any] = proxy.health()["slot"]
    return body


def run_attacks(site: HostileSite, proxy: RunningProxy) -> dict[str, Any]:
    site.page = ATTACKS.replace("PROXY", proxy.url).replace("GEMMA", GEMMA)
    with chromium() as browser:
        page = browser.new_page()
        page.goto(site.url + "/")
        page.wait_for_function("window.done === true", timeout=60_000)
        results: dict[str, Any] = page.evaluate("window.results")
    return results


def test_a_page_of_another_origin_changes_nothing(ws: Workspace, hostile_site: HostileSite) -> None:
    proxy = ws.start_proxy()
    try:
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        before = slot(proxy)
        results = run_attacks(hostile_site, proxy)
        after = slot(proxy)
        assert after["holder"] == SMOL_ENTRY  # not stopped, not swapped
        assert after["swaps"] == before["swaps"]
        assert [e["event"] for e in after["history"]] == [e["event"] for e in before["history"]]
        # The page could not read a thing: no CORS headers for it.
        assert results["read models"] == "failed: TypeError"
        assert results["activate"] == "failed: TypeError"  # its preflight got no CORS answer
        # The refusals are the proxy's: the requests reached it and were turned away.
        log = (ws.root / "proxy.out").read_text()
        assert log.count("refused Origin") >= 3
        assert log.count("on POST /v1/admin/stop") == 2  # by fetch, by the form
        assert log.count("on POST /v1/chat/completions") == 1
    finally:
        proxy.terminate()


def test_the_same_page_with_its_origin_trusted_does_stop_the_model(
    ws: Workspace, hostile_site: HostileSite
) -> None:
    """The control: what the first test shows is the proxy's defence, not a page that fails."""
    ws.extra_env["CHAT_PROXY_ALLOWED_ORIGINS"] = hostile_site.url
    proxy = ws.start_proxy()
    try:
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        run_attacks(hostile_site, proxy)
        after = slot(proxy)
        stopped = [e["model"] for e in after["history"] if e["event"] == "stopping"]
        assert SMOL_ENTRY in stopped
        assert after["holder"] != SMOL_ENTRY
    finally:
        proxy.terminate()


def test_a_dns_rebinding_page_is_refused_on_its_own_origin(ws: Workspace) -> None:
    proxy = ws.start_proxy()
    try:
        assert proxy.chat(SMOL, max_tokens=4).status_code == 200
        port = proxy.url.rsplit(":", 1)[1]
        rebinding = "--host-resolver-rules=MAP evil.example 127.0.0.1"
        with chromium([rebinding]) as browser:
            page = browser.new_page()
            response = page.goto(f"http://evil.example:{port}/v1/models")
            assert response is not None
            assert response.status == 403
            assert "host_not_allowed" in page.content()
            # From "its own" origin, the page's requests are same-origin to the browser.
            stop_status = page.evaluate(
                """() => fetch("/v1/admin/stop", {method: "POST",
                    headers: {"Content-Type": "application/json"}, body: "{}"})
                    .then(r => r.status)"""
            )
            assert stop_status == 403
        assert slot(proxy)["holder"] == SMOL_ENTRY
        # The proxy's own names still work.
        assert httpx.get(f"http://localhost:{port}/v1/models").status_code == 200
    finally:
        proxy.terminate()
