"""`failgate demo`: an echo API on loopback plus Failgate in front of it, in one process, on memory://."""

from __future__ import annotations

import logging
import sys
from importlib import resources
from typing import Any

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


def echo_app(jwks: Any = None) -> web.Application:
    app = web.Application()
    if jwks is not None:  # the demo's identity provider: its key set, as an IdP publishes it
        async def key_set(_: web.Request) -> web.Response:
            return web.json_response(jwks)

        app.router.add_get("/.well-known/jwks.json", key_set)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


class DemoIdentityProvider:
    """An ES256 key made for this run: its public half as a JWKS, and a token for the demo's jwt route."""

    def __init__(self) -> None:
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec

        self._jwt = jwt
        self._key = ec.generate_private_key(ec.SECP256R1())
        public = msgspec.json.decode(jwt.get_algorithm_by_name("ES256").to_jwk(self._key.public_key()))
        self.jwks = {"keys": [{**public, "kid": "demo-1", "use": "sig", "alg": "ES256"}]}

    def token(self, hours: int = 24) -> str:
        import time

        now = int(time.time())
        return self._jwt.encode({"iss": "failgate-demo", "aud": "demo-api", "sub": "demo-user", "scope": "read",
                                 "iat": now, "exp": now + hours * 3600}, self._key, algorithm="ES256",
                                headers={"kid": "demo-1"})


GUIDE = """
Failgate demo is running.
  proxy  http://127.0.0.1:8080   (config: config/demo.yaml, store: memory://)
  admin  http://127.0.0.1:9901   (/metrics /healthz /readyz /config)
  echo   http://127.0.0.1:8081   (the API behind it: answers with what it received)

A demo API key (principal "demo", scope "read") and a JWT (subject "demo-user", valid 24 h) were made for this run:
  export KEY={key}
  export TOKEN={token}

Try:
  curl -si localhost:8080/public/hello                # forwarded; note the RateLimit headers
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}} ' localhost:8080/public/x; done; echo
                                                      # 5 per 10 s, then 429 with Retry-After
  curl -si localhost:8080/api/v1/users                # 401: no key
  curl -s -H "Authorization: Bearer $KEY" 'localhost:8080/api/v1/users?id=7'
                                                      # forwarded as /users?id=7 with X-Failgate-Principal: demo
  curl -s -H "Authorization: Bearer $TOKEN" localhost:8080/jwt/me  # a JWT, verified with the demo's own JWKS
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
                    msgspec.json.encode(Record(principal="demo", scopes=tuple(DEMO_SCOPES))))
    return key


async def _main() -> int:
    from .server import run_single

    text = resources.files("proxy").joinpath("resources/demo.yaml").read_text()
    try:
        loaded = load_text(text, "config/demo.yaml")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    idp = DemoIdentityProvider()
    runner = web.AppRunner(echo_app(idp.jwks), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, ECHO_HOST, ECHO_PORT).start()
    except OSError as exc:
        print(f"error: cannot start the demo's echo API on {ECHO_HOST}:{ECHO_PORT}: {exc.strerror}",
              file=sys.stderr)
        await runner.cleanup()
        return 1
    def started(serving: object) -> None:
        print(GUIDE.format(key=seed_demo_key(serving), token=idp.token()), flush=True)

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
