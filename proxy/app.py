"""The request pipeline, in one place: target -> route -> checks -> forward (SPEC §2, §7).

`Runtime` is one compiled config. The handler reads the current runtime once per request, so a reload (an
atomic swap of `Proxy.runtime`) never changes the config under a request in flight.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import time
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from .config import ConfigError, LoadedConfig
from .forward import HOP_BY_HOP, ClientGone, Outgoing, UpstreamClient, UpstreamFailed, connection_tokens
from .observe.metrics import RouteMetrics
from .responses import error_response
from .routing import BadTarget, Router, compile_match, host_of, parse_target

log = logging.getLogger("failgate.app")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:+=/@-]{1,128}$")
# Failgate's own identity headers: a client must never be able to send them upstream (SPEC §5).
_OWN = ("x-failgate-principal", "x-failgate-scopes")
_NO_ROUTE = RouteMetrics("")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstream: UpstreamClient
    strip: int  # characters of the matched prefix to remove; 0 when strip_prefix is off
    preserve_host: bool
    metrics: RouteMetrics


ROUTE: web.RequestKey[Route] = web.RequestKey("route", Route)


class Runtime:
    """A compiled config: the router, its routes and upstream clients, and the per-request settings."""

    def __init__(self, loaded: LoadedConfig, *, enforce_checks: bool = True) -> None:
        cfg = loaded.config
        self.loaded = loaded
        if enforce_checks:
            refuse_unbuilt_checks(loaded)
        self.upstreams = {name: UpstreamClient(name, up) for name, up in cfg.upstreams.items()}
        entries = []
        for r in cfg.routes:
            m = compile_match(r.match.path, r.match.prefix, r.match.methods, r.match.host)
            strip = len(m.path) if r.strip_prefix and m.path != "/" else 0
            route = Route(r.name, self.upstreams[r.upstream], strip, cfg.upstreams[r.upstream].preserve_host,
                          RouteMetrics(r.name))
            entries.append((m, route))
        self.router: Router = Router(entries)
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in cfg.trusted_proxies]
        self.request_id_header = cfg.headers.request_id
        self.max_body = cfg.limits.max_body
        self.strip = frozenset(
            [cfg.headers.degraded.lower(), *_OWN, "host", "x-forwarded-proto", "x-forwarded-host",
             "x-forwarded-for", cfg.headers.request_id.lower(), "expect"]
        ) | HOP_BY_HOP
        self.own = frozenset([cfg.headers.degraded.lower(), *_OWN])

    async def close(self) -> None:
        for up in self.upstreams.values():
            await up.close()

    def client_address(self, peer: str | None, xff: list[str]) -> str:
        """The rightmost address not in `trusted_proxies` (the peer itself when it is not trusted)."""
        if peer is None:
            return ""
        if not self.trusted or not self._is_trusted(peer):
            return peer
        hops = [h.strip() for v in xff for h in v.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)


def refuse_unbuilt_checks(loaded: LoadedConfig) -> None:
    """Running a config whose checks this build cannot enforce would let every request through unchecked."""
    for i, r in enumerate(loaded.config.routes):
        for check in ("auth", "rate_limit"):
            if getattr(r, check) is not None:
                raise ConfigError(loaded.source, f"routes[{i}].{check}",
                                  f"{check} checks are not enforced by this build of Failgate yet; refusing to "
                                  "run a route whose check would be silently skipped")


class Proxy:
    """The proxy listener's request handler."""

    def __init__(self, runtime: Runtime, *, tls: bool) -> None:
        self.runtime = runtime
        self._proto = "https" if tls else "http"

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        rt = self.runtime  # one config for the whole request, whatever a reload does meanwhile
        started = time.perf_counter()
        rid_header = rt.request_id_header
        rid = request.headers.get(rid_header)
        if rid is None or not _REQUEST_ID_OK.match(rid):
            rid = os.urandom(12).hex()
        try:
            resp = await self._handle(request, rt, rid)
        except UpstreamFailed as exc:
            route = request.get(ROUTE)
            resp = error_response(exc.status, exc.detail, route=route.name if route else None, request_id=rid,
                                  request_id_header=rid_header)
            if exc.status == 413:
                resp.force_close()  # don't read the rest of an oversized body
        except ClientGone as gone:
            # The client went away mid-response: counted as 499, the status nginx logs for it.
            self._count(request.get(ROUTE), 499, started)
            return gone.response
        self._count(request.get(ROUTE), resp.status, started)
        return resp

    @staticmethod
    def _count(route: Route | None, status: int, started: float) -> None:
        metrics = route.metrics if route is not None else _NO_ROUTE
        metrics.count(status)
        metrics.duration.observe(time.perf_counter() - started)

    async def _handle(self, request: web.BaseRequest, rt: Runtime, rid: str) -> web.StreamResponse:
        method = request.method
        rid_header = rt.request_id_header
        if method == "CONNECT":
            return error_response(405, "CONNECT is not supported", route=None, request_id=rid,
                                  request_id_header=rid_header)
        try:
            target = parse_target(request.raw_path)
        except BadTarget as exc:
            return error_response(400, str(exc), route=None, request_id=rid, request_id_header=rid_header)
        headers = request.headers
        host = host_of(target.authority or headers.get("Host"))
        route = rt.router.match(method, host, target.path)
        if route is None:
            allowed = rt.router.allowed(host, target.path)
            if allowed:
                return error_response(405, f"{method} is not allowed here", route=None, request_id=rid,
                                      request_id_header=rid_header, headers={"Allow": ", ".join(sorted(allowed))})
            return error_response(404, "no route matches this request", route=None, request_id=rid,
                                  request_id_header=rid_header)
        assert isinstance(route, Route)
        request[ROUTE] = route
        if "Upgrade" in headers:
            resp = error_response(501, "protocol upgrades (WebSocket) are not supported yet", route=route.name,
                                  request_id=rid, request_id_header=rid_header)
            resp.force_close()
            return resp

        # -- checks (auth, then rate_limit) go here, in this order, once they exist --

        out = self._outgoing(request, rt, route, target.path, target.query, rid, method)
        if headers.get("Expect", "").lower() == "100-continue":
            # The checks passed: now the client may send its body.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await route.upstream.forward(request, out)

    def _outgoing(self, request: web.BaseRequest, rt: Runtime, route: Route, path: str, query: str,
                  rid: str, method: str) -> Outgoing:
        src = request.headers
        drop = rt.strip
        tokens = connection_tokens(src)
        if tokens:
            drop = drop | tokens
        own = rt.own
        out: CIMultiDict[str] = CIMultiDict()
        for name, value in src.items():
            low = name.lower()
            if low in drop or ("_" in low and low.replace("_", "-") in own):
                continue
            out.add(name, value)
        peer = request.remote
        xff = src.getall("X-Forwarded-For", [])
        out["X-Forwarded-For"] = ", ".join([*xff, peer]) if xff and peer else (peer or "")
        out["X-Forwarded-Proto"] = self._proto
        client_host = src.get("Host")
        if client_host is not None:
            out["X-Forwarded-Host"] = client_host
        out[rt.request_id_header] = rid
        out["Host"] = (client_host or route.upstream.host_header) if route.preserve_host \
            else route.upstream.host_header
        if route.strip:
            path = path[route.strip:] or "/"
            if not path.startswith("/"):
                path = "/" + path
        return Outgoing(method, f"{path}?{query}" if query else path, out, rt.max_body, rt.request_id_header, rid)
