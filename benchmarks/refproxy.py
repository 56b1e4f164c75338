"""The floor a Python proxy starts from: aiohttp + uvloop, one pooled ClientSession, access log off, no routing,
no checks, no metrics. `python -m benchmarks.refproxy LISTEN_PORT UPSTREAM_URL [REDIS_URL]`

With REDIS_URL it also makes one sliding-window rate-limit call per request through Failgate's own Redis client
(`proxy/store/redis.py`), awaited directly in the handler: the floor for "a proxy plus one store round trip",
to tell the cost of that round trip from the cost of Failgate's pipeline around it."""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection", "trailer", "host"}


def make_app(upstream: str, redis_url: str | None = None) -> web.Application:
    from proxy.store.ops import RateOp

    store = None
    op = RateOp("sliding_window", "ref:{rl:one}:sliding_window:60000", 1_000_000_000, 60_000_000, 1_000_000_000)

    async def start(app: web.Application) -> None:
        nonlocal store
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        if redis_url:
            from proxy.store.redis import RedisStore

            store = RedisStore(redis_url, timeout=5.0, connect_timeout=1.0, pool_size=4)

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        if store is not None:
            (result,) = await store.execute([op])
            if not result.allowed:
                return web.Response(status=429)
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

    redis_url = sys.argv[3] if len(sys.argv) > 3 else None
    web.run_app(make_app(sys.argv[2], redis_url), host="127.0.0.1", port=int(sys.argv[1]), access_log=None,
                print=None, loop=uvloop.new_event_loop())
