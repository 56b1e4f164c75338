"""The admin listener: health, readiness, the running config (redacted) and metrics.

It is served by whichever process owns the workers' view: the parent in multi-worker mode, the only process
otherwise. `Status` is the narrow interface it needs from that owner.
"""

from __future__ import annotations

import hmac
import re
from typing import Any, Protocol

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .config import LoadedConfig, format_duration
from .config.schema import ByteSize, Duration
from .config.values import redact_url
from .keyspace import digest_of
from .observe.metrics import exposition
from .reload import ConfigState


class Status(Protocol):
    config: ConfigState

    def ready(self) -> tuple[bool, dict[str, Any]]: ...
    async def revoke(self, digest: str) -> dict[str, Any]: ...
    async def control(self, cmd: dict[str, Any]) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...


_json = msgspec.json.Encoder().encode
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def redacted(loaded: LoadedConfig) -> dict[str, Any]:
    """The config as plain data with every secret replaced by "***"."""
    doc: dict[str, Any] = msgspec.to_builtins(loaded.config, enc_hook=_enc)
    if doc["admin"].get("token"):
        doc["admin"]["token"] = "***"
    doc["store"]["url"] = redact_url(doc["store"]["url"])
    for up in doc["upstreams"].values():
        if up.get("url") is not None:
            up["url"] = redact_url(up["url"])
        if up.get("targets") is not None:
            up["targets"] = [redact_url(url) for url in up["targets"]]
    for path in loaded.from_env:  # anything that came from ${VAR} is treated as a secret
        _set_path(doc, path, "***")
    return doc


def _bad(detail: str) -> web.Response:
    return web.json_response({"error": "bad_request", "detail": detail}, status=400)


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _enc(value: Any) -> Any:
    if isinstance(value, Duration):
        return format_duration(value)
    if isinstance(value, ByteSize):
        return int(value)
    raise NotImplementedError(type(value))


def _set_path(doc: Any, path: str, value: str) -> None:
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node = doc
    for i, part in enumerate(parts):
        key: Any = int(part[1:-1]) if part.startswith("[") else part
        last = i == len(parts) - 1
        try:
            if last:
                if isinstance(node, list) or (isinstance(node, dict) and key in node):
                    node[key] = value
            else:
                node = node[key]
        except (KeyError, IndexError, TypeError):
            return


def build_admin(status: Status, token: str | None, *, chaos: bool = False) -> web.Application:
    expected = f"Bearer {token}".encode() if token is not None else b""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        # The token (when set) guards everything that changes state and the running config; compared in constant
        # time, and any bytes a client sends are just a wrong token (401), never an error.
        if token is not None and (request.method in ("POST", "DELETE") or request.path == "/config"):
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, expected):
                return web.json_response({"error": "unauthorized", "detail": "admin token required"},
                                         status=401, headers={"WWW-Authenticate": "Bearer"})
        # A browser can POST text/plain or a form to any address without asking first, but not JSON: requiring
        # it keeps a web page from driving the admin listener (reloads, outage rehearsals) when no token is set.
        if request.method == "POST" and request.content_type != "application/json":
            return web.json_response({"error": "unsupported_media_type", "detail": "send Content-Type: "
                                      "application/json (a JSON body, or none)"}, status=415)
        return await handler(request)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(_: web.Request) -> web.Response:
        ok, detail = status.ready()
        return web.Response(body=_json({"ready": ok, **detail}), status=200 if ok else 503,
                            content_type="application/json")

    async def config(_: web.Request) -> web.Response:
        state = status.config
        loaded = state.current
        assert loaded is not None
        body = {"sha256": loaded.sha256, "loaded_at": loaded.loaded_at, **state.describe(),
                "config": redacted(loaded)}
        return web.Response(body=_json(body), content_type="application/json")

    async def reload(_: web.Request) -> web.Response:
        result = await status.reload()
        return web.json_response(result, status=422 if result["result"] == "rejected" else 200)

    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=exposition())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def chaos_set(request: web.Request) -> web.Response:
        body = await _json_object(request)
        if body is None:
            return _bad('expected a JSON object such as {"fault": "hang", "for": "30s"}')
        unknown = set(body) - {"fault", "delay", "for"}
        if unknown:
            return _bad(f"unknown keys: {', '.join(sorted(unknown))}; expected fault, delay, for")
        reply = await status.control({"op": "chaos", "fault": body.get("fault"), "delay": body.get("delay"),
                                      "for": body.get("for", "30s")})
        if not reply.get("ok"):
            return _bad(str(reply.get("error")))
        return web.json_response({"fault": body.get("fault"), "for": body.get("for", "30s"),
                                  "delay": body.get("delay")})

    async def chaos_clear(_: web.Request) -> web.Response:
        await status.control({"op": "chaos_clear"})
        return web.json_response({"fault": None})

    async def keys_revoke(request: web.Request) -> web.Response:
        body = await _json_object(request)
        key, digest = (body or {}).get("key"), (body or {}).get("hash")
        if isinstance(key, str) and key and digest is None:
            digest = digest_of(key)
        if not isinstance(digest, str) or not _HEX64.match(digest):
            return _bad('expected {"key": "<the API key>"} or {"hash": "<its 64-hex SHA-256>"}')
        return web.json_response(await status.revoke(digest))

    async def test_stall(request: web.Request) -> web.Response:
        body = await _json_object(request)
        if body is None:
            return _bad('expected a JSON object such as {"ms": 200, "at": "queued"}')
        reply = await status.control({"op": "test_stall", "ms": body.get("ms"), "at": body.get("at")})
        if not reply.get("ok"):
            return _bad(str(reply.get("error")))
        return web.json_response({"stall": body})

    app = web.Application(middlewares=[guard])
    from . import testhooks

    if testhooks.ENABLED:  # Failgate's own test suite only; see testhooks.py
        app.router.add_post("/_test/stall", test_stall)
    if chaos:
        app.router.add_post("/chaos/store", chaos_set)
        app.router.add_delete("/chaos/store", chaos_clear)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", config)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/reload", reload)
    app.router.add_post("/keys/revoke", keys_revoke)
    return app
