"""The dashboard at `/ui` in a real headless Chromium (Debian's `chromium`), driving the real
`imageworks-chat-proxy` console script and the two llama.cpp demo models.

The browser tests share one proxy and one page and run in order: they walk through what an
operator does (look, activate, stop, reload, restart). Every console error and uncaught page
error fails them, with one precise exception while the proxy restarts (see `Console`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Error, Page, expect

from conftest import REPO_ROOT, make_demo_workspace, write_json
from imageworks.backends.llamacpp import find_llama_server
from support.browser import chromium
from support.crashing_server import SAFE_FLAG, write_crashing_launcher
from support.fake_ollama import FakeOllama
from support.model_servers import serve_through
from support.proxy_process import RunningProxy, Workspace, free_port, processes_listening_on
from support.proxy_server import ProxyServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SMOL = "smollm2 135m (Q4 1)"
GEMMA = "gemma3 270m (Q4 K M)"
SMOL_ENTRY = "smollm2_135m_(Q4_1)"
OLLAMA_MODEL = "qwen3 8b (Q4 K M)"  # the demo registry's Ollama example
OLLAMA_ENTRY = "qwen3_8b_(Q4_K_M)"
SWAP_MS = 60_000  # a demo model starts in a few seconds on a CPU; a loaded CI runner is slower
# A model server that dies at once, saying why on stderr (its log).
FAILING_SERVER = "#!/bin/sh\necho 'error: cannot open the weights' >&2\nexit 3\n"


@dataclass
class Console:
    """Console errors and uncaught exceptions of the page.

    Chromium itself writes `Failed to load resource: net::ERR_...` to the console when a fetch
    gets no HTTP answer. The proxy's exec restart hands its listening socket over, so polls
    normally just wait; should the port refuse or reset a connection during the restart the
    test causes, that line is the browser reporting the outage, not the page's code failing.
    So during that window, and only then, such a line about the page's poll of
    `/v1/admin/overview` is excused (and kept in `excused`). Everything else counts."""

    poll_url: str
    errors: list[str] = field(default_factory=list)
    excused: list[str] = field(default_factory=list)
    restarting: bool = False

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        line = f"{message.text} ({message.location.get('url', '?')})"
        network = message.text.startswith("Failed to load resource: net::ERR_")
        if self.restarting and network and message.location.get("url") == self.poll_url:
            self.excused.append(line)
        else:
            self.errors.append(line)

    def on_page_error(self, error: Error) -> None:
        self.errors.append(f"uncaught: {error.message}")


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("IMAGEWORKS_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def overview(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/admin/overview", timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Workspace]:
    workdir = tmp_path_factory.mktemp("dashboard")
    make_demo_workspace(workdir, demo_models)
    ws = Workspace(workdir)
    yield ws
    ws.close()


@pytest.fixture(scope="module")
def proxy(workspace: Workspace) -> Iterator[RunningProxy]:
    running = workspace.start_proxy()
    yield running
    if running.process.poll() is None:
        running.terminate()


@pytest.fixture(scope="module")
def console(proxy: RunningProxy) -> Console:
    return Console(poll_url=f"{proxy.url}/v1/admin/overview")


@pytest.fixture(scope="module")
def page(browser: Browser, proxy: RunningProxy, console: Console) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    opened.on("console", console.on_console)
    opened.on("pageerror", console.on_page_error)
    opened.goto(f"{proxy.url}/ui")
    yield opened
    context.close()


def models_row(page: Page, model: str) -> Any:
    return page.get_by_role("table", name="Models").get_by_role("row").filter(has_text=model)


def test_dashboard_loads_without_console_errors_and_lists_the_demo_models(
    page: Page, console: Console
) -> None:
    expect(page.locator("#connection")).to_have_text("live")
    expect(models_row(page, SMOL)).to_have_count(1)
    expect(models_row(page, GEMMA)).to_have_count(1)
    for model in (SMOL, GEMMA):
        expect(models_row(page, model).locator("td.state")).to_have_text("idle")
        expect(page.get_by_role("button", name=f"Activate {model}")).to_be_enabled()
    expect(page.locator("#slot-state")).to_have_text("empty")
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # no sideways scroll
    assert console.errors == []


def test_dashboard_activate_starts_the_model_and_shows_it_active(
    page: Page, proxy: RunningProxy, workspace: Workspace, console: Console
) -> None:
    page.get_by_role("button", name=f"Activate {SMOL}").click()
    expect(models_row(page, SMOL).locator("td.state")).to_have_text("active", timeout=SWAP_MS)
    expect(page.locator("#slot-holder")).to_contain_text(SMOL)
    expect(page.locator("#slot-state")).to_have_text("ready")
    expect(page.locator("#message")).to_contain_text(f"{SMOL} is active")
    expect(page.get_by_role("button", name=f"Activate {SMOL}")).to_be_disabled()
    assert overview(proxy.url)["slot"]["holder"] == SMOL_ENTRY
    assert processes_listening_on(workspace.model_port)  # a real llama.cpp process
    assert console.errors == []


def test_dashboard_lists_a_request_with_its_status_latency_and_tokens(
    page: Page, proxy: RunningProxy, console: Console
) -> None:
    assert proxy.chat(SMOL, max_tokens=8).status_code == 200
    row = page.get_by_role("table", name="Recent requests").get_by_role("row").filter(has_text=SMOL)
    expect(row.first).to_contain_text("200 ok", timeout=10_000)
    expect(row.first).to_contain_text(re.compile(r"\d+ ms"))
    expect(page.locator("#chart rect.bar").first).to_be_attached()
    assert console.errors == []


def test_dashboard_screenshot_is_saved_as_an_artifact(page: Page) -> None:
    path = artifacts_dir() / "dashboard.png"
    page.screenshot(path=path, full_page=True)
    assert path.stat().st_size > 10_000


def test_dashboard_stop_frees_the_gpu(
    page: Page, proxy: RunningProxy, workspace: Workspace, console: Console
) -> None:
    page.get_by_role("button", name="Stop model").click()
    expect(page.locator("#slot-state")).to_have_text("empty", timeout=SWAP_MS)
    expect(page.locator("#slot-holder")).to_contain_text("the GPU is free")
    expect(models_row(page, SMOL).locator("td.state")).to_have_text("idle")
    expect(page.locator("#message")).to_contain_text("the GPU is free")
    assert overview(proxy.url)["slot"]["holder"] is None
    assert processes_listening_on(workspace.model_port) == []
    assert console.errors == []


def test_dashboard_reload_reports_the_entry_count(
    page: Page, workspace: Workspace, console: Console
) -> None:
    registry = workspace.root / "configs" / "model_registry.curated.json"
    entries = len(json.loads(registry.read_text()))
    page.get_by_role("button", name="Reload registry").click()
    expect(page.locator("#message")).to_contain_text(f"Registry reloaded: {entries} entries")
    assert console.errors == []


def test_dashboard_restart_shows_it_and_reconnects_to_the_new_proxy(
    page: Page, proxy: RunningProxy, console: Console
) -> None:
    before = overview(proxy.url)["proxy"]
    console.restarting = True
    page.get_by_role("button", name="Restart Chat Proxy").click()
    expect(page.locator("#connection")).to_have_text("restarting…")
    expect(page.locator("#connection")).to_have_text("restarted", timeout=SWAP_MS)
    console.restarting = False

    after = overview(proxy.url)["proxy"]
    assert after["boot_id"] != before["boot_id"]
    expect(page.locator("#proxy-boot")).to_have_text(after["boot_id"][:8])
    expect(page.locator("#message")).to_contain_text("Chat Proxy restarted")
    assert proxy.health()["status"]  # the proxy is really back
    assert after["pid"] == before["pid"] == proxy.process.pid  # exec: same process, new program
    expect(models_row(page, SMOL)).to_have_count(1)
    assert console.errors == []


def test_dashboard_shows_a_failed_start_with_the_model_servers_log_tail(
    browser: Browser, tmp_path: Path, demo_models: Path
) -> None:
    make_demo_workspace(tmp_path, demo_models)
    ws = Workspace(tmp_path)
    serve_through(ws, FAILING_SERVER)
    with ws.serving() as running:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        try:
            page = context.new_page()
            page.goto(f"{running.url}/ui")
            page.get_by_role("button", name=f"Activate {SMOL}").click()
            expect(page.locator("#message")).to_contain_text(
                f"Error: Activating {SMOL} failed", timeout=SWAP_MS
            )
            expect(page.locator("#error-summary")).to_contain_text(SMOL)
            expect(page.locator("#error-log")).to_contain_text("cannot open the weights")
            expect(models_row(page, SMOL).locator("td.state")).to_have_text("idle")
            expect(page.locator("#slot-state")).to_have_text("empty")
            page.screenshot(path=artifacts_dir() / "dashboard-failed-start.png", full_page=True)
        finally:
            context.close()


def overview_model(url: str, name: str) -> dict[str, Any]:
    model: dict[str, Any] = next(m for m in overview(url)["models"] if m["name"] == name)
    return model


def test_dashboard_shows_an_ollama_entry_unreachable_while_its_ollama_is_down(
    browser: Browser, tmp_path: Path, demo_models: Path
) -> None:
    make_demo_workspace(tmp_path, demo_models)
    ws = Workspace(tmp_path)
    host = f"http://127.0.0.1:{free_port()}"  # no Ollama there, until the fake one starts
    ws.extra_env.update(IMAGEWORKS_OLLAMA_HOST=host, CHAT_PROXY_INSTALLED_REFRESH_S="0.3")
    running = ws.start_proxy()
    console = Console(poll_url=f"{running.url}/v1/admin/overview")
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.on("console", console.on_console)
        page.on("pageerror", console.on_page_error)
        page.goto(f"{running.url}/ui")
        state = models_row(page, OLLAMA_MODEL).locator("td.state")
        activate = page.get_by_role("button", name=f"Activate {OLLAMA_MODEL}")
        why = re.compile(
            rf"^Ollama at {re.escape(host)} does not answer: .+; "
            r"start it or set IMAGEWORKS_OLLAMA_HOST$"
        )
        expect(state).to_have_text("unreachable")
        # The reason and the fix, in the row under the model's, describe its disabled button.
        expect(page.get_by_role("row").filter(has_text=f"Ollama at {host}")).to_have_text(why)
        expect(activate).to_be_disabled()
        expect(activate).to_have_accessible_description(why)
        expect(models_row(page, SMOL).locator("td.state")).to_have_text("idle")
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        page.screenshot(path=artifacts_dir() / "dashboard-ollama-unreachable.png", full_page=True)
        model = overview_model(running.url, OLLAMA_ENTRY)
        assert model["state"] == "unreachable"
        assert model["unreachable"]["reason"].startswith(f"Ollama at {host} does not answer: ")
        assert model["unreachable"]["fix"] == "start it or set IMAGEWORKS_OLLAMA_HOST"

        with FakeOllama(port=int(host.rsplit(":", 1)[1])):  # Ollama comes up, with qwen3:8b
            expect(state).to_have_text("idle", timeout=10_000)
            expect(activate).to_be_enabled()
            model = overview_model(running.url, OLLAMA_ENTRY)
            assert (model["installed"], model["unreachable"]) == (True, None)
            expect(page.get_by_role("row").filter(has_text=f"Ollama at {host}")).to_be_hidden()
        expect(state).to_have_text("unreachable", timeout=10_000)  # and goes down again
        expect(activate).to_be_disabled()
        assert console.errors == []
    finally:
        context.close()
        running.terminate()


@pytest.fixture
def empty_registry(registry_dir: Path) -> Path:
    write_json(registry_dir / "model_registry.curated.json", [])
    return registry_dir


def test_dashboard_asks_for_the_admin_key_and_keeps_it_for_the_session(
    browser: Browser, empty_registry: Path, tmp_path: Path
) -> None:
    with ProxyServer(empty_registry, tmp_path, admin_key="admin-secret") as server:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.goto(f"{server.url}/ui")
        expect(page.locator("#connection")).to_have_text("admin key needed")
        page.get_by_label("Admin key").fill("not-the-key")
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("#connection")).to_have_text("admin key needed")
        expect(page.locator("#key-note")).to_have_text("That key was refused.")
        page.get_by_label("Admin key").fill("admin-secret")
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("#connection")).to_have_text("live")
        page.reload()  # sessionStorage keeps the key for this tab
        expect(page.locator("#connection")).to_have_text("live")
        expect(page.get_by_label("Admin key")).to_be_hidden()
        context.close()


def test_dashboard_page_needs_no_key_when_keys_are_configured(
    empty_registry: Path, tmp_path: Path
) -> None:
    keys = {"api_keys": frozenset({"user-key"}), "admin_key": "admin-key"}
    with ProxyServer(empty_registry, tmp_path, **keys) as server:
        assert httpx.get(f"{server.url}/v1/admin/overview").status_code == 401  # keys are on
        for path in ("/ui", "/ui/", "/ui/app.js", "/ui/style.css"):
            response = httpx.get(f"{server.url}{path}")
            assert response.status_code == 200, path
            assert response.headers["content-security-policy"].startswith("default-src 'self'")


def test_dashboard_says_a_model_runs_in_safe_mode(
    browser: Browser, tmp_path: Path, demo_models: Path
) -> None:
    """The real llama-server behind a launcher that crashes at load unless given --no-repack:
    the model is active, and the row under it says it runs in safe mode."""
    make_demo_workspace(tmp_path, demo_models)
    ws = Workspace(tmp_path)
    real = find_llama_server(None).binary
    assert real is not None, "llama-server is part of the demo dependencies"
    ws.extra_env.update(
        CHAT_PROXY_LLAMA_SERVER_BINARY=str(write_crashing_launcher(tmp_path, then=real)),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    running = ws.start_proxy()
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.goto(f"{running.url}/ui")
        page.get_by_role("button", name=f"Activate {SMOL}").click()
        expect(models_row(page, SMOL).locator("td.state")).to_have_text("active", timeout=SWAP_MS)
        note = page.get_by_role("row").filter(has_text="runs in safe mode")
        expect(note).to_have_text(
            f"runs in safe mode ({SAFE_FLAG}): its server crashed while loading without it"
        )
        expect(models_row(page, GEMMA).locator("td.state")).to_have_text("idle")
        page.screenshot(path=artifacts_dir() / "dashboard-safe-mode.png", full_page=True)
        assert overview_model(running.url, SMOL_ENTRY)["safe_mode"] == [SAFE_FLAG]
    finally:
        context.close()
        ws.close()
