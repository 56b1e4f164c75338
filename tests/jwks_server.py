"""A real JWKS endpoint for tests (aiohttp on loopback): keys made with `cryptography`, tokens signed with PyJWT,
and switchable failures — refuse (stopped), hang, 500, garbage — with a count of the fetches it served."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.helpers import free_port

ISSUER = "https://idp.test/"
AUDIENCE = "payments-api"


class Key:
    def __init__(self, kid: str, alg: str) -> None:
        self.kid, self.alg = kid, alg
        self.private = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if alg.startswith("RS")
                        else ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        jwk = json.loads(algorithm.to_jwk(self.private.public_key()))  # type: ignore[arg-type]
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg}

    def token(self, *, sub: str = "ann", scope: str = "payments:write", exp: float | None = None,
              kid: str | None = None, **claims: Any) -> str:
        now = time.time()
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": scope, "iat": int(now),
                "exp": int(exp if exp is not None else now + 3600), **claims}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": kid or self.kid})


class JwksServer:
    def __init__(self) -> None:
        self.keys = [Key("rsa-1", "RS256"), Key("ec-1", "ES256")]
        self.mode = "ok"  # ok | hang | error | garbage
        self.fetches = 0
        self.port = free_port()
        self.runner: web.AppRunner | None = None
        self.cache_control: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    async def start(self) -> JwksServer:
        app = web.Application()
        app.router.add_get("/jwks.json", self._serve)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:  # refused from now on
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _serve(self, _: web.Request) -> web.StreamResponse:
        self.fetches += 1
        if self.mode == "hang":
            await asyncio.Event().wait()  # never answers (the server is stopped under it)
        if self.mode == "error":
            return web.Response(status=500, text="identity provider down")
        if self.mode == "garbage":
            return web.Response(text="{not json", content_type="application/json")
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        return web.json_response({"keys": [k.jwk() for k in self.keys]}, headers=headers)
