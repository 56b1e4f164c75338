"""The request pipeline, in one place: target -> route -> checks (auth, then rate_limit) -> forward.

`Runtime` is one compiled config. The handler reads the current runtime once per request, so a reload (an
atomic swap of `Proxy.runtime`) never changes the config under a request in flight.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import re
import time
from dataclasses import dataclass

from aiohttp import web, web_response
from aiohttp.http import HttpVersion10, HttpVersion11

from .checks.auth import AuthCheck, Identity
from .checks.local import LocalLimiter
from .checks.memo import KeyMemory
from .checks.ratelimit import RateLimitCheck
from .config import LoadedConfig
from .config.validate import resolve_workers
from .forward import HOP_BY_HOP, SPOOFABLE, ClientGone, Outgoing, UpstreamClient, UpstreamFailed, upstream_headers
from .listener import MalformedLog
from .observe.decisionlog import DecisionLog, LogWriter
from .observe.metrics import RouteMetrics, StoreMetrics
from .pipeline import Decision, run_checks
from .responses import error_response
from .routing import Authority, BadTarget, Router, Target, authority_of, compile_match, parse_target
from .store.breaker import BreakerStore

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:+=/@-]{1,128}$")
# Failgate's own identity headers: a client must never be able to send them upstream (SPEC §5).
# Always stripped from what clients send, whatever `headers.degraded` renames the tag to: an upstream that once
# read the default name must not be fooled by a client copy of it after a rename.
_OWN = ("failgate-degraded", "x-failgate-principal", "x-failgate-scopes", "x-failgate-plan")
_NO_ROUTE = RouteMetrics("")
_SERVED_VERSIONS = (HttpVersion10, HttpVersion11)
# Request ids: a random per-process prefix and a counter — unique, and no system call per request.
_RID_PREFIX = os.urandom(6).hex()
_rid_counter = itertools.count(1)


def _next_request_id() -> str:
    return f"{_RID_PREFIX}{next(_rid_counter):012x}"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstream: UpstreamClient
    strip: int  # characters of the matched prefix to remove; 0 when strip_prefix is off
    preserve_host: bool
    metrics: RouteMetrics
    auth: AuthCheck | None
    rate_limit: RateLimitCheck | None
    drop_credentials: str | None  # the credential header, when forward_credentials is false


ROUTE: web.RequestKey[Route] = web.RequestKey("route", Route)
CHECKED: web.RequestKey[tuple[Decision, str]] = web.RequestKey("checked", tuple)  # (decision, client)


class Runtime:
    """A compiled config: the router, its routes and upstream clients, and the per-request settings."""

    def __init__(self, loaded: LoadedConfig, store: BreakerStore, *, workers: int | None = None,
                 local: LocalLimiter | None = None, keys: KeyMemory | None = None,
                 decisions: DecisionLog | None = None, upstreams: dict[str, UpstreamClient] | None = None) -> None:
        cfg = loaded.config
        self.loaded = loaded
        self.store = store
        self.decisions = decisions if decisions is not None else DecisionLog(LogWriter(), loaded.sha256)
        # Process-wide memories, kept across reloads: rate-limit state for `stale`, API-key answers.
        self.local = local if local is not None else LocalLimiter()
        self.keys = keys if keys is not None else KeyMemory()  # (an empty KeyMemory is falsy: no `or` here)
        self.store_metrics = StoreMetrics()
        workers = workers or resolve_workers(cfg.workers)
        # An upstream whose settings did not change keeps its pooled session across a reload.
        reuse = upstreams or {}
        self.upstreams = {name: reuse[name] if name in reuse and reuse[name].cfg == up else UpstreamClient(name, up)
                          for name, up in cfg.upstreams.items()}
        self.active = 0  # requests in flight on this runtime
        self._drained: asyncio.Event | None = None
        entries = []
        for r in cfg.routes:
            m = compile_match(r.match.path, r.match.prefix, r.match.methods, r.match.host)
            strip = len(m.path) if r.strip_prefix and m.path != "/" else 0
            rl = auth = None
            if r.rate_limit is not None:
                rl = RateLimitCheck(r.name, r.rate_limit, key_prefix=cfg.store.key_prefix, workers=workers,
                                    auth_header=r.auth.header if r.auth is not None else None,
                                    auth_scheme=r.auth.scheme if r.auth is not None else None)
            if r.auth is not None:
                auth = AuthCheck(r.name, r.auth, key_prefix=cfg.store.key_prefix)
            drop = r.auth.header.lower() if r.auth is not None and not r.auth.forward_credentials else None
            route = Route(r.name, self.upstreams[r.upstream], strip, cfg.upstreams[r.upstream].preserve_host,
                          RouteMetrics(r.name), auth, rl, drop)
            entries.append((m, route))
        self.router: Router = Router(entries)
        self.trusted = [ipaddress.ip_network(c, strict=False) for c in cfg.trusted_proxies]
        self.request_id_header = cfg.headers.request_id
        self.degraded_header = cfg.headers.degraded
        self.retry_after = cfg.store.breaker.open_for
        self.max_body = cfg.limits.max_body
        self.max_header_size = cfg.limits.max_header_size
        # aiohttp names itself and Python's version in the Server header of every response unless told otherwise.
        web_response.SERVER_SOFTWARE = cfg.headers.server
        # Headers never passed on as the client sent them (Failgate sets its own), and, from a peer that
        # trusted_proxies does not vouch for, the headers a client could use to lie about itself.
        self.strip = frozenset(
            [cfg.headers.degraded.lower(), *_OWN, "host", "x-forwarded-host", "x-forwarded-for",
             cfg.headers.request_id.lower(), "expect"]
        ) | HOP_BY_HOP
        self.strip_untrusted = self.strip | SPOOFABLE
        self.own = frozenset([cfg.headers.degraded.lower(), *_OWN])

    async def close(self, keep: set[UpstreamClient] | None = None) -> None:
        for up in self.upstreams.values():
            if keep is None or up not in keep:
                await up.close()

    async def drained(self) -> None:
        """Wait until no request started on this runtime is still in flight (after a swap)."""
        if self.active == 0:
            return
        self._drained = asyncio.Event()
        await self._drained.wait()

    def _finished(self) -> None:
        self.active -= 1
        if self.active == 0 and self._drained is not None:
            self._drained.set()

    def is_trusted_peer(self, peer: str | None) -> bool:
        return bool(self.trusted) and peer is not None and self._is_trusted(peer)

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


class Proxy:
    """The proxy listener's request handler."""

    def __init__(self, runtime: Runtime, *, tls: bool) -> None:
        self.runtime = runtime
        self._proto = "https" if tls else "http"
        self._port = 443 if tls else 80  # the default port, dropped from the request's host
        self._malformed = MalformedLog()
        self.draining = False  # set at shutdown: every response then closes its connection

    def refuse(self, status: int, detail: str, route: str | None = None) -> web.Response:
        """Failgate's answer to a request it will not serve before routing (unparsable, too large, wrong
        version): counted under route "", logged in a once-a-second summary, never with a traceback."""
        rt = self.runtime
        self._malformed.record(status, detail)
        if route is None:
            _NO_ROUTE.count(status)
        return error_response(status, detail, route=route, request_id=_next_request_id(),
                              request_id_header=rt.request_id_header)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # One coroutine for the whole request (routing and header work are plain functions below): every await
        # level costs on every resumption, and a request resumes several times.
        rt = self.runtime  # one config for the whole request, whatever a reload does meanwhile
        started = time.perf_counter()
        rid_header = rt.request_id_header
        rid = request.headers.get(rid_header)
        if rid is None or not _REQUEST_ID_OK.match(rid):
            rid = _next_request_id()
        rt.active += 1
        try:
            routed = self._route(request, rt, rid)
            if isinstance(routed, web.StreamResponse):
                resp = routed
            else:
                route, target, authority = routed
                reply: list[tuple[str, str]] = [(rid_header, rid)]
                tag = identity = denied = None
                # --- checks (pipeline.py: auth, then rate_limit; the first deny is the response) ---
                if route.auth is not None or route.rate_limit is not None:
                    client = rt.client_address(request.remote, request.headers.getall("X-Forwarded-For", []))
                    decision = await run_checks(rt, route, request.headers, client)
                    request[CHECKED] = (decision, client)
                    identity = decision.identity
                    tag, denied = self._decided(decision, reply, rt, route, rid)
                if denied is not None:
                    resp = denied
                else:
                    out = self._outgoing(request, rt, route, target, authority, reply, tag, identity, rid)
                    if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
                        # The size and the checks passed: now the client may send its body (never to HTTP/1.0).
                        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    resp = await route.upstream.forward(request, out)
        except UpstreamFailed as exc:
            route_ = request.get(ROUTE)
            resp = error_response(exc.status, exc.detail, route=route_.name if route_ else None, request_id=rid,
                                  request_id_header=rid_header, headers=exc.headers)
            if exc.status == 413:
                resp.force_close()  # don't read the rest of an oversized body
            elif route_ is not None:  # 502, 504: one structured line each, whether or not the access log is on
                rt.decisions.event({"event": "upstream_error", "request_id": rid, "route": route_.name,
                                    "upstream": route_.upstream.name, "status": exc.status, "detail": exc.detail})
        except ClientGone as gone:
            # The client went away mid-response: counted as 499, the status nginx logs for it.
            self._count(request.get(ROUTE), 499, started)
            self._log_decisions(request, rt, rid, 499)
            return gone.response
        finally:
            rt._finished()
        if self.draining:
            resp.force_close()  # Connection: close — the client must not send another request on this connection
        self._count(request.get(ROUTE), resp.status, started)
        self._log_decisions(request, rt, rid, resp.status)
        return resp

    @staticmethod
    def _log_decisions(request: web.BaseRequest, rt: Runtime, rid: str, status: int) -> None:
        """One decision-log line per deny and per degraded verdict (SPEC §9)."""
        checked = request.get(CHECKED)
        if checked is None:
            return
        decision, client = checked
        route = request[ROUTE].name
        principal = decision.identity.principal if decision.identity is not None else None
        for v in decision.verdicts:
            if v.degraded or not v.allow:
                rt.decisions.record(request_id=rid, route=route, check=v.check,
                                    decision="allow" if v.allow else "deny", basis=v.basis, reason=v.reason,
                                    status=status, client=client, principal=principal)

    @staticmethod
    def _count(route: Route | None, status: int, started: float) -> None:
        metrics = route.metrics if route is not None else _NO_ROUTE
        metrics.count(status)
        metrics.duration.observe(time.perf_counter() - started)

    def _route(self, request: web.BaseRequest, rt: Runtime,
               rid: str) -> web.StreamResponse | tuple[Route, Target, Authority | None]:
        """The route for this request, or the response that refuses it (400, 404, 405, 413, 431, 501, 505)."""
        method = request.method
        version = request.version
        if version is not HttpVersion11 and version not in _SERVED_VERSIONS:
            # Answer in a version we speak (aiohttp writes the request's version in the status line).
            request._message = request._message._replace(version=HttpVersion11)
            request._version = HttpVersion11
            request._cache["version"] = HttpVersion11
            return self._refused(505, "only HTTP/1.0 and HTTP/1.1 are served", rid)
        size = 0
        for name, value in request.raw_headers:  # the parser bounds each field and their count, not their sum
            size += len(name) + len(value) + 4
        if size > rt.max_header_size:
            return self._refused(431, f"the request headers are larger than {rt.max_header_size} bytes in all", rid)
        if method == "CONNECT":
            return self._refused(405, "CONNECT is not supported", rid, close=False)
        headers = request.headers
        try:
            target = parse_target(request.raw_path)
            # One authority: an absolute-form target's wins over Host (which is then ignored and replaced).
            raw_host = target.authority if target.authority is not None else headers.get("Host")
            authority = None
            if raw_host or target.authority is not None:
                authority = authority_of(raw_host or "", target.port or self._port)
        except BadTarget as exc:
            return self._refused(400, str(exc), rid, close=False)
        host = authority.name if authority is not None else None
        route = rt.router.match(method, host, target.path)
        rid_header = rt.request_id_header
        if route is None:
            allowed = rt.router.allowed(host, target.path)
            if allowed:
                return error_response(405, f"{method} is not allowed here", route=None, request_id=rid,
                                      request_id_header=rid_header, headers={"Allow": ", ".join(sorted(allowed))})
            return error_response(404, "no route matches this request", route=None, request_id=rid,
                                  request_id_header=rid_header)
        assert isinstance(route, Route)
        request[ROUTE] = route
        length = request.content_length
        if length is not None and length > rt.max_body:  # before the checks, and before any 100 Continue
            resp = error_response(413, f"the request body is larger than {rt.max_body} bytes", route=route.name,
                                  request_id=rid, request_id_header=rid_header)
            resp.force_close()
            return resp
        if route.auth is not None and len(headers.getall(route.auth.header, ())) > 1:
            return error_response(400, f"more than one {route.auth.header} header", route=route.name,
                                  request_id=rid, request_id_header=rid_header)
        if "Upgrade" in headers:
            resp = error_response(501, "protocol upgrades (WebSocket) are not supported yet", route=route.name,
                                  request_id=rid, request_id_header=rid_header)
            resp.force_close()
            return resp
        return route, target, authority

    def _refused(self, status: int, detail: str, rid: str, *, close: bool = True) -> web.Response:
        """A request refused before routing: counted under route "" by the handler, summarized in the log."""
        self._malformed.record(status, detail)
        resp = error_response(status, detail, route=None, request_id=rid,
                              request_id_header=self.runtime.request_id_header)
        if close:
            resp.force_close()
        return resp

    @staticmethod
    def _decided(decision: Decision, reply: list[tuple[str, str]], rt: Runtime, route: Route,
                 rid: str) -> tuple[str | None, web.Response | None]:
        """Headers of the verdicts into `reply`; the degraded tag; the deny response, if any."""
        for v in decision.verdicts:
            if v is not decision.deny:
                reply.extend(v.headers)
        tag = None
        degraded = [v.tag() for v in decision.verdicts if v.degraded]
        if degraded:
            tag = ", ".join(degraded)
            reply.append((rt.degraded_header, tag))
        deny = decision.deny
        if deny is None:
            return tag, None
        extra = dict(reply[1:])
        extra.update(deny.headers)
        return tag, error_response(deny.status, deny.detail, route=route.name, request_id=rid,
                                   request_id_header=rt.request_id_header, code=deny.code, headers=extra)

    def _outgoing(self, request: web.BaseRequest, rt: Runtime, route: Route, target: Target,
                  authority: Authority | None, reply: list[tuple[str, str]], tag: str | None,
                  identity: Identity | None, rid: str) -> Outgoing:
        trusted = rt.is_trusted_peer(request.remote)
        out_headers = upstream_headers(request, rt.strip if trusted else rt.strip_untrusted, rt.own, route.upstream,
                                       authority.value if authority is not None else None, route.preserve_host,
                                       self._proto, trusted, rt.request_id_header, rid)
        if tag is not None:
            out_headers[rt.degraded_header] = tag
        if identity is not None:
            out_headers["X-Failgate-Principal"] = identity.principal
            out_headers["X-Failgate-Scopes"] = ",".join(identity.scopes)
        if route.drop_credentials is not None:
            out_headers.popall(route.drop_credentials, None)
        if route.upstream.authorization is not None:  # the upstream's own credentials, from its URL
            out_headers["Authorization"] = route.upstream.authorization
        path = target.path
        if route.strip:
            path = path[route.strip:] or "/"
        return Outgoing(request.method, f"{path}?{target.query}" if target.query else path, out_headers,
                        rt.max_body, reply)
