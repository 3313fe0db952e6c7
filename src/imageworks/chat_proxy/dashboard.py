"""The operator's dashboard at `GET /ui`: three static files shipped in the package (`ui/`),
read into memory once when the router is built and served with a strict content security policy.
The page itself talks only to `/v1/admin/*` on the same origin; it needs no key to load."""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

# Everything the page loads comes from the proxy itself: no CDN, no inline script or style.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'"
)
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def dashboard_routes() -> list[BaseRoute]:
    """`GET /ui` (and `/ui/`) is the page; `/ui/app.js` and `/ui/style.css` its script and style."""
    folder = files("imageworks.chat_proxy").joinpath("ui")
    headers = {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    responses = {
        name: (folder.joinpath(name).read_bytes(), media_type)
        for name, media_type in ASSETS.items()
    }

    def serving(name: str) -> Route:
        body, media_type = responses[name]

        async def serve(_: Request) -> Response:
            return Response(body, media_type=media_type, headers=headers)

        path = "/ui/" + name if name != "index.html" else "/ui"
        return Route(path, serve, methods=["GET"], include_in_schema=False)

    page = serving("index.html")
    also_page = Route("/ui/", page.endpoint, methods=["GET"], include_in_schema=False)
    return [page, also_page, serving("app.js"), serving("style.css")]
