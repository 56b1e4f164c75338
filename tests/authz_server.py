"""A real external authorizer for tests (aiohttp on loopback): decides by the Authorization header it is sent,
records every call, and can fail on demand — hang, 500, reset, refuse (stopped)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from tests.helpers import free_port


class AuthzServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "ok"  # ok | hang | error | reset | gate (answers once `release` is set)
        self.release = asyncio.Event()
        self.calls: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/check"

    async def start(self) -> AuthzServer:
        app = web.Application()
        app.router.add_get("/check", self._check)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _check(self, request: web.Request) -> web.StreamResponse:
        self.calls.append({k.lower(): v for k, v in request.headers.items()})
        if self.mode == "hang":
            await asyncio.Event().wait()  # never answers (the server is stopped under it)
        if self.mode == "gate":
            await self.release.wait()
        if self.mode == "error":
            return web.Response(status=500, text="authorizer broken")
        if self.mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        credential = request.headers.get("Authorization", "")
        if credential.startswith("Bearer good"):
            user = credential.rsplit("-", 1)[-1] if "-" in credential else "alice"
            # (and a session cookie of its own, as authorizers behind a login page set: for that client only)
            return web.Response(text="ok", headers={"X-User-Id": user, "X-User-Plan": "pro", "X-Other": "no",
                                                    "Set-Cookie": f"authz_session={user}; Path=/"})
        if credential == "Bearer redirect":
            return web.Response(status=302, headers={"Location": "https://login.test/?next=/"})
        if credential == "Bearer forbidden":
            resp = web.Response(status=403, text="not for you")
            resp.enable_compression()  # (compressed only if the caller accepts it, as web servers do)
            return resp
        return web.Response(status=401, text='{"why": "no"}', content_type="application/json",
                            headers={"WWW-Authenticate": 'Bearer realm="authz"'})
