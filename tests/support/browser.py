"""Debian's Chromium, headless, driven by Playwright (which never downloads a browser here)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from playwright.sync_api import Browser, sync_playwright

from support.tools import require_program

# As root in a container: no sandbox. The rest keeps Chromium off the network it cannot reach
# (without them it retries Google's services many times at once).
_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextmanager
def chromium(extra_args: Sequence[str] = ()) -> Iterator[Browser]:
    executable = require_program("chromium", "chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=[*_ARGS, *extra_args])
        try:
            yield browser
        finally:
            browser.close()
