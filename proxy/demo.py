"""`failgate demo`: an echo API on loopback plus Failgate in front of it, in one process, on memory://."""

from __future__ import annotations

import logging
import sys
from importlib import resources

import msgspec
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

A demo API key (principal "demo", scope "read") was created for this run:
  export KEY={key}

Try:
  curl -si localhost:8080/public/hello                # forwarded; note the RateLimit headers
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' localhost:8080/public/x; done; echo
                                                      # 5 per 10 s, then 429 with Retry-After
  curl -si localhost:8080/api/v1/users                # 401: no key
  curl -s -H "Authorization: Bearer $KEY" 'localhost:8080/api/v1/users?id=7'
                                                      # forwarded as /users?id=7 with X-Failgate-Principal: demo
  curl -si -H "Authorization: Bearer $KEY" localhost:8080/admin     # 403: the key lacks the admin scope
  curl -si -X DELETE localhost:8080/api/v1/users      # 405: the route allows GET, POST
  curl -si 'localhost:8080/public/%2e%2e/admin'       # normalized to /admin before matching
  curl -s localhost:9901/metrics | grep -E 'failgate_(requests|decisions)_total'

Rehearse a store outage (the game-day switch):
  curl -s -XPOST localhost:9901/chaos/store -H 'Content-Type: application/json' -d '{{"fault": "hang", "for": "60s"}}'
  curl -si localhost:8080/public/x | grep -i failgate-degraded     # rate_limit;mode=open;reason=timeout,
                                                                   # then reason=breaker_open
  curl -si -H "Authorization: Bearer $KEY" localhost:8080/api/v1/x | grep -i degraded
                                                                   # auth;mode=stale;...;age=N: remembered
  curl -si localhost:8080/admin -H "Authorization: Bearer $KEY"    # admin fails closed: 503, Retry-After
  curl -s localhost:9901/readyz                                    # still ready; breaker and chaos state
  curl -s -XDELETE localhost:9901/chaos/store                      # recovered after breaker.open_for (2 s)
Ctrl-C stops it.
"""


DEMO_SCOPES = ["read"]


def seed_demo_key(serving: object) -> str:
    """Put one API key into the demo's memory:// store (and its epoch marker); returns the key."""
    import time

    from .checks.memo import Record
    from .keys import new_key
    from .keyspace import digest_of, epoch_key, record_key
    from .store.memory import MemoryStore

    store = getattr(serving, "store", None)
    assert isinstance(store, MemoryStore)
    prefix = serving.loaded.config.store.key_prefix  # type: ignore[attr-defined]
    key = new_key()
    store.set_value(epoch_key(prefix), str(int(time.time())).encode())
    store.set_value(record_key(prefix, digest_of(key)),
                    msgspec.json.encode(Record(principal="demo", scopes=DEMO_SCOPES)))
    return key


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
    def started(serving: object) -> None:
        print(GUIDE.format(key=seed_demo_key(serving)), flush=True)

    from .reload import ConfigState

    state = ConfigState("config/demo.yaml", None)
    state.current = loaded
    try:
        await run_single(state, on_started=started)
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
