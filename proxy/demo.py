"""`failgate demo`: an echo API on loopback plus Failgate in front of it, in one process, on memory://."""

from __future__ import annotations

import logging
import sys
from importlib import resources

from aiohttp import web

from .config import ConfigError, load_text

log = logging.getLogger("failgate.demo")
ECHO_HOST, ECHO_PORT = "127.0.0.1", 8081


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    if request.path.startswith("/status/"):
        try:
            return web.json_response({"status": int(request.path.rsplit("/", 1)[1])},
                                     status=int(request.path.rsplit("/", 1)[1]))
        except ValueError:
            pass
    return web.json_response({
        "method": request.method,
        "path": request.raw_path.split("?", 1)[0],
        "query": request.query_string,
        "headers": dict(request.headers),
        "body_bytes": len(body),
    })


def echo_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


GUIDE = """
Failgate demo is running.
  proxy  http://127.0.0.1:8080   (config: config/demo.yaml, store: memory://)
  admin  http://127.0.0.1:9901   (/metrics /healthz /readyz /config)
  echo   http://127.0.0.1:8081   (the API behind it: answers with what it received)

Try:
  curl -s localhost:8080/public/hello                 # forwarded as /public/hello
  curl -s localhost:8080/api/v1/users?id=7            # forwarded as /users?id=7 (prefix stripped)
  curl -si -X DELETE localhost:8080/api/v1/users      # 405: the route allows GET, POST
  curl -si localhost:8080/nowhere                     # 404 from Failgate, JSON body
  curl -si 'localhost:8080/public/%2e%2e/admin'       # normalized to /admin before matching: 404
  curl -s localhost:9901/metrics | grep failgate_requests_total
Ctrl-C stops it.
"""


async def _main() -> int:
    from .server import run_single

    text = resources.files("proxy").joinpath("resources/demo.yaml").read_text()
    try:
        loaded = load_text(text, "config/demo.yaml")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    runner = web.AppRunner(echo_app(), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, ECHO_HOST, ECHO_PORT).start()
    except OSError as exc:
        print(f"error: cannot start the demo's echo API on {ECHO_HOST}:{ECHO_PORT}: {exc.strerror}",
              file=sys.stderr)
        await runner.cleanup()
        return 1
    print(GUIDE, flush=True)
    try:
        await run_single(loaded)
    finally:
        await runner.cleanup()
    return 0


def run_demo() -> int:
    import uvloop

    try:
        return uvloop.run(_main())
    except OSError as exc:
        print(f"error: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
