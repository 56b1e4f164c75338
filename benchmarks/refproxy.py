"""The floor a Python proxy starts from: aiohttp + uvloop, one pooled ClientSession, access log off, no routing,
no checks, no metrics. `python -m benchmarks.refproxy LISTEN_PORT UPSTREAM_URL`"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection", "trailer", "host"}


def make_app(upstream: str) -> web.Application:
    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        data = request.content if request.body_exists else None
        async with app["session"].request(request.method, upstream + request.path_qs, headers=headers,
                                          data=data, allow_redirects=False) as up:
            body = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP | {"content-length"}}
            return web.Response(status=up.status, body=body, headers=out)

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


if __name__ == "__main__":
    import uvloop

    web.run_app(make_app(sys.argv[2]), host="127.0.0.1", port=int(sys.argv[1]), access_log=None,
                print=None, loop=uvloop.new_event_loop())
