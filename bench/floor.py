"""The floor: the thinnest pass-through aiohttp can be, to show what any Python proxy on this
stack costs before it does any work of its own.

    python -m bench.floor --port P --upstream http://127.0.0.1:U

One aiohttp.web server, one aiohttp ClientSession (keep-alive pool) to one upstream. Every
request is forwarded as it came (method, path, body, content type): no routing, no parsing of
the body, no model names. An answer with a Content-Length is read whole and returned; any other
answer (a stream) is written on chunk by chunk as each one arrives. The proxy's own cost is its
row minus this one; what this row adds over direct is the framework's and the second hop's.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

_PASSED_HEADERS = ("Content-Type", "Accept", "Authorization")


def make_app(upstream: str) -> web.Application:
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def open_session(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        app[session_key] = aiohttp.ClientSession(
            base_url=upstream, connector=connector, auto_decompress=False
        )

    async def close_session(app: web.Application) -> None:
        await app[session_key].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {
            name: request.headers[name] for name in _PASSED_HEADERS if name in request.headers
        }
        body = await request.read()
        session = request.app[session_key]
        async with session.request(
            request.method, request.rel_url, data=body or None, headers=headers
        ) as answer:
            passed = {"Content-Type": answer.headers.get("Content-Type", "application/json")}
            if answer.content_length is not None:
                return web.Response(status=answer.status, body=await answer.read(), headers=passed)
            response = web.StreamResponse(status=answer.status, headers=passed)
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8101")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handle_signals=True,
        loop=loop_factory() if loop_factory else None,
    )


if __name__ == "__main__":
    main()
