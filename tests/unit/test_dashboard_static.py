"""The dashboard's static files: served from the package with their types and a strict content
security policy, loading nothing from anywhere else and nothing the policy would refuse."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib.resources import files

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from imageworks.chat_proxy.dashboard import CONTENT_SECURITY_POLICY, dashboard_routes

pytestmark = pytest.mark.timeout(30)

UI = files("imageworks.chat_proxy").joinpath("ui")
FILES = ("index.html", "app.js", "style.css")


@pytest.fixture
def client() -> TestClient:
    return TestClient(Starlette(routes=dashboard_routes()))


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data


def _page() -> _Tags:
    parser = _Tags()
    parser.feed(UI.joinpath("index.html").read_text(encoding="utf-8"))
    return parser


@pytest.mark.parametrize(
    ("path", "content_type", "name"),
    [
        ("/ui", "text/html; charset=utf-8", "index.html"),
        ("/ui/", "text/html; charset=utf-8", "index.html"),
        ("/ui/app.js", "text/javascript; charset=utf-8", "app.js"),
        ("/ui/style.css", "text/css; charset=utf-8", "style.css"),
    ],
)
def test_dashboard_serves_each_file_with_its_content_type(
    client: TestClient, path: str, content_type: str, name: str
) -> None:
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.content == UI.joinpath(name).read_bytes()


@pytest.mark.parametrize("path", ["/ui", "/ui/app.js", "/ui/style.css"])
def test_dashboard_responses_carry_a_strict_policy_and_are_revalidated(
    client: TestClient, path: str
) -> None:
    headers = client.get(path).headers
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-cache"


def test_dashboard_policy_allows_only_the_proxy_itself() -> None:
    directives = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert directives == {
        "default-src": "'self'",
        "script-src": "'self'",
        "style-src": "'self'",
        "img-src": "'self' data:",
        "connect-src": "'self'",
        "frame-ancestors": "'none'",
    }


def test_dashboard_unknown_file_is_a_404(client: TestClient) -> None:
    assert client.get("/ui/favicon.ico").status_code == 404


@pytest.mark.parametrize("name", FILES)
def test_dashboard_files_name_no_other_origin(name: str) -> None:
    text = UI.joinpath(name).read_text(encoding="utf-8")
    assert not re.findall(r"(?i)\b(?:https?|wss?|ftp):", text)
    assert not re.findall(r"""(?i)(?:src|href|url\()\s*=?\s*["']?//""", text)  # //host/...
    assert "@import" not in text


def test_dashboard_page_loads_only_its_own_files_and_inline_images() -> None:
    links = [
        value
        for _, attrs in _page().tags
        for key, value in attrs.items()
        if key in ("src", "href") and value is not None
    ]
    own = [link for link in links if not link.startswith("data:image/")]
    assert sorted(own) == ["/ui/app.js", "/ui/style.css"]
    assert any(link.startswith("data:image/") for link in links)  # the favicon: no 404


def test_dashboard_page_has_nothing_inline_that_the_policy_refuses() -> None:
    page = _page()
    assert not page.script_text.strip()
    assert all(tag != "style" for tag, _ in page.tags)
    for tag, attrs in page.tags:
        assert "style" not in attrs, tag
        assert not [key for key in attrs if key.startswith("on")], tag
    script = UI.joinpath("app.js").read_text(encoding="utf-8")
    assert 'setAttribute("style"' not in script
    assert "innerHTML" not in script  # text is set as text: model names cannot inject markup
    assert "eval(" not in script
    assert "new Function" not in script


def test_dashboard_has_the_buttons_the_runbook_names() -> None:
    page = UI.joinpath("index.html").read_text(encoding="utf-8")
    labels = set(re.findall(r"<button[^>]*>([^<]+)</button>", page))
    assert {"Stop model", "Reload registry", "Restart Chat Proxy"} <= labels


def test_dashboard_never_blocks_on_a_dialog_or_writes_to_the_console() -> None:
    script = UI.joinpath("app.js").read_text(encoding="utf-8")
    for call in ("confirm(", "alert(", "prompt(", "console.", "setInterval("):
        assert call not in script
