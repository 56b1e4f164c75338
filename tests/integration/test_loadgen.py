"""The bundled load generator against a real server: counts, statuses, chunked bodies, the degraded header."""

from __future__ import annotations

import asyncio

from aiohttp import web

from benchmarks.load import Options, run_load
from tests.helpers import free_port


async def test_generator_counts_statuses_and_degraded_modes() -> None:
    n = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal n
        n += 1
        if n % 4 == 0:  # chunked
            resp = web.StreamResponse(status=201)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b"abc")
            await resp.write(b"defgh")
            await resp.write_eof()
            return resp
        headers = {"Failgate-Degraded": "auth;mode=stale;reason=timeout;age=3, rate_limit;mode=open;reason=timeout"} \
            if n % 4 == 1 else {}
        return web.Response(status=200 if n % 2 else 429, text="x" * (n % 7), headers=headers)

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        result = await asyncio.to_thread(run_load, Options(f"http://127.0.0.1:{port}/", concurrency=4, duration=1.0,
                                                           warmup=0.0, progress=False))
    finally:
        await runner.cleanup()
    s = result.summary()
    assert s["requests"] > 50 and not s["errors"]
    assert set(s["statuses"]) == {"200", "201", "429"}
    # every response was parsed to its end: the server saw no more requests than answered plus in flight
    assert n - s["requests"] <= 4 + 10
    assert s["degraded"]["stale"] == s["degraded"]["open"] > 0
    assert s["latency_us"]["p50"] > 0 and s["latency_us"]["max"] >= s["latency_us"]["p99"]
