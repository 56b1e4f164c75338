"""The proxy listener's request handler: target -> route -> checks (pipeline.py) -> forward.

The handler reads the current `Runtime` (compiled.py) once per request, so a reload — an atomic swap of
`Proxy.runtime` — never changes the config under a request in flight. What the handler learns about a request
travels in one small `Facts` object, not in aiohttp's request mapping.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from time import perf_counter, time
from typing import Any, Final

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy, istr

from .compiled import Route, Runtime
from .decision import Decision, Identity, Verdict
from .forward import ClientGone, Outgoing, Trace, UpstreamFailed, upstream_headers
from .listener import MalformedLog
from .observe.decisionlog import LogWriter
from .observe.metrics import RouteMetrics
from .pipeline import run_checks
from .responses import error_response
from .routing import Authority, BadTarget, Target, authority_of, parse_target
from .websocket import Tunnels, is_websocket, take_query_param, tunnel

# the identity headers sent upstream and the rate-limit fields sent back, as multidict's case-insensitive strings
# (set without lower-casing them)
# (Final: a compiled build keeps each in a C variable instead of looking it up by name on every request)
_PRINCIPAL: Final = istr("X-Failgate-Principal")
_SCOPES: Final = istr("X-Failgate-Scopes")
_PLAN: Final = istr("X-Failgate-Plan")
_RATELIMIT_POLICY: Final = istr("RateLimit-Policy")
_RATELIMIT: Final = istr("RateLimit")
_REQUEST_ID_OK: Final = re.compile(r"^[A-Za-z0-9._:+=/@-]{1,128}$")
_NO_ROUTE: Final = RouteMetrics("")
_SERVED_VERSIONS: Final = (HttpVersion10, HttpVersion11)
# Request ids: a random per-process prefix and a counter — unique, and no system call per request.
_RID_PREFIX: Final = os.urandom(6).hex()
_rid_counter: Final = itertools.count(1)


def _next_request_id() -> str:
    return f"{_RID_PREFIX}{next(_rid_counter):012x}"


def _rate_limit_fields(verdicts: list[Verdict], reply: list[tuple[str, str]]) -> int:
    """The IETF RateLimit fields of every limit that reported a quota (checked, or enforced locally), into
    `reply`; returns the Retry-After of a 429: the largest among the denying limits. The fields never contradict
    one another: `r` never exceeds `q`, and no denying limit's `t` is below that Retry-After."""
    quotas = [v for v in verdicts if v.quota is not None]
    if not quotas:
        return 0
    if len(quotas) == 1:  # one limit: the common case
        v = quotas[0]
        q = v.quota
        assert q is not None
        retry = 0 if v.allow else max(1, math.ceil(q.retry_after))
        reply.append((_RATELIMIT_POLICY, q.item))
        reply.append((_RATELIMIT, f'"{q.policy}";r={q.r};t={max(math.ceil(q.reset_after), retry)}'))
        return retry
    retry = 0
    for v in quotas:
        if not v.allow:
            retry = max(retry, math.ceil(v.quota.retry_after), 1)  # type: ignore[union-attr]
    policies, remaining = [], []
    for v in quotas:
        q = v.quota
        t = math.ceil(q.reset_after)  # type: ignore[union-attr]
        if not v.allow and t < retry:
            t = retry
        policies.append(q.item)  # type: ignore[union-attr]
        remaining.append(f'"{q.policy}";r={q.r};t={t}')  # type: ignore[union-attr]
    reply.append((_RATELIMIT_POLICY, ", ".join(policies)))
    reply.append((_RATELIMIT, ", ".join(remaining)))
    return retry


def _bytes_out(resp: web.StreamResponse) -> int:
    """The response body's bytes: streamed ones are written by now, a whole one (aiohttp writes it after the
    handler returns) by its length."""
    if resp.prepared:
        return resp.body_length
    body = resp.body if isinstance(resp, web.Response) else None
    return len(body) if isinstance(body, (bytes, bytearray)) else 0


class Facts:
    """What the handler learned about one request, for its response, its metrics and its log lines. (A plain
    class: a dataclass's generated __init__ would be interpreted on every request, even in a compiled build.)"""

    __slots__ = ("checks", "client", "decision", "released", "rid", "route", "started", "trace", "websocket")

    def __init__(self, rid: str, started: float) -> None:
        self.rid = rid
        self.started = started
        self.route: Route | None = None
        self.client = ""
        self.decision: Decision | None = None
        self.websocket = False  # an `Upgrade: websocket` handshake
        self.trace: Trace | None = None  # the upstream leg, for the access log
        self.checks = 0.0  # seconds spent in the checks (the store round trips, an authorizer)
        self.released = False  # no longer counted as in flight on its config (a tunnel, once established)


class Proxy:
    """The proxy listener's request handler."""

    def __init__(self, runtime: Runtime, *, tls: bool, access_log: LogWriter | None = None) -> None:
        self.runtime = runtime
        self.access_log = access_log
        self._proto = "https" if tls else "http"
        self._port = 443 if tls else 80  # the default port, dropped from the request's host
        self._malformed = MalformedLog()
        self.draining = False  # set at shutdown: every response then closes its connection
        self.tunnels = Tunnels()  # open WebSocket tunnels, and their client session

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
        rid_header = rt.request_id_header
        rid = request.headers.get(rid_header)
        if rid is None or not _REQUEST_ID_OK.match(rid):
            rid = _next_request_id()
        facts = Facts(rid, perf_counter())
        rt.active += 1
        try:
            routed = self._route(request, rt, facts)
            if isinstance(routed, web.StreamResponse):
                resp = routed
            else:
                route, target, authority = routed
                tag = identity = denied = None
                reply: list[tuple[str, str]] = []
                check_headers = request.headers
                if facts.websocket and route.query_param is not None:
                    moved = self._credential_from_query(request, route, target, rid)
                    if isinstance(moved, web.StreamResponse):
                        return self._done(request, rt, facts, moved)
                    check_headers, target = moved
                if route.checked:
                    facts.client = rt.client_address(request.remote, request.headers)
                    facts_for_authorizer: tuple[str, str, str | None, str] = ("GET", "/", None, rid)
                    if route.auth is not None and route.auth.remote:
                        uri = f"{target.path}?{target.query}" if target.query else target.path
                        facts_for_authorizer = (request.method, uri, authority.value if authority else None, rid)
                    began = perf_counter()
                    decision = facts.decision = await run_checks(rt, route, check_headers, facts.client,
                                                                 facts_for_authorizer)
                    facts.checks = perf_counter() - began
                    identity = decision.identity
                    tag, denied = self._decided(decision, reply, rt, route, rid)
                if denied is not None:
                    resp = denied
                else:
                    out = self._outgoing(request, rt, route, target, authority, reply, tag, identity, rid)
                    facts.trace = out.trace
                    if facts.decision is not None:
                        for v in facts.decision.verdicts:  # an authorizer's headers for the upstream
                            for name, value in v.upstream:
                                out.headers[name] = value
                    if facts.websocket:
                        if check_headers is not request.headers and not route.drop_credentials:
                            # a credential from the query string goes upstream as the header auth read it from
                            out.headers[route.auth.header] = check_headers[route.auth.header]  # type: ignore[union-attr]
                        resp = await tunnel(request, route.upstream, out, route.name, self.tunnels,
                                            route.websocket_max_duration, lambda: self._release(rt, facts))
                        return self._done(request, rt, facts, resp)
                    expect = request.headers.get(hdrs.EXPECT)
                    if expect is not None and request.version == HttpVersion11 and expect.lower() == "100-continue":
                        # The size and the checks passed: now the client may send its body (never to HTTP/1.0).
                        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    resp = await route.upstream.forward(request, out)
        except UpstreamFailed as exc:
            route_ = facts.route
            resp = error_response(exc.status, exc.detail, route=route_.name if route_ else None, request_id=rid,
                                  request_id_header=rid_header, headers=exc.headers)
            if exc.status == 413:
                resp.force_close()  # don't read the rest of an oversized body
            elif route_ is not None:  # 502, 504: one structured line each, whether or not the access log is on
                rt.decisions.event({"event": "upstream_error", "request_id": rid, "route": route_.name,
                                    "upstream": route_.upstream.name, "status": exc.status, "detail": exc.detail})
        except ClientGone as gone:
            # The client went away mid-response: counted as 499, the status nginx logs for it.
            self._finish(request, rt, facts, 499, gone.response.body_length)
            return gone.response
        finally:
            if not facts.released:
                rt.finished()
        return self._done(request, rt, facts, resp)

    def _done(self, request: web.BaseRequest, rt: Runtime, facts: Facts,
              resp: web.StreamResponse) -> web.StreamResponse:
        if self.draining:
            resp.force_close()  # Connection: close — the client must not send another request on this connection
        self._finish(request, rt, facts, resp.status, _bytes_out(resp) if self.access_log is not None else 0)
        return resp

    @staticmethod
    def _release(rt: Runtime, facts: Facts) -> None:
        """A tunnel is established: it no longer holds its config's drain (a reload retires that config once its
        HTTP requests are done; the tunnel goes on)."""
        if not facts.released:
            facts.released = True
            rt.finished()

    def _credential_from_query(self, request: web.BaseRequest, route: Route, target: Target,
                               rid: str) -> web.StreamResponse | tuple[Any, Target]:
        """A WebSocket handshake's credential in the query parameter `auth.query_param` (browsers cannot set
        headers on one): moved into the header auth reads, and removed from the target sent upstream (and so
        from every log)."""
        auth = route.auth
        assert auth is not None and route.query_param is not None
        values, query = take_query_param(target.query, route.query_param)
        target = Target(target.path, query, target.authority, target.port)
        if not values:
            return request.headers, target
        if len(values) > 1 or auth.cfg.header in request.headers:
            return error_response(400, f"more than one credential (the {route.query_param} parameter, or it and the "
                                  f"{auth.cfg.header} header)", route=route.name, request_id=rid,
                                  request_id_header=self.runtime.request_id_header)
        headers = CIMultiDict(request.headers)
        scheme = auth.cfg.scheme
        headers[auth.cfg.header] = f"{scheme} {values[0]}" if scheme else values[0]
        return CIMultiDictProxy(headers), target

    def _finish(self, request: web.BaseRequest, rt: Runtime, facts: Facts, status: int,
                response_bytes: int = 0) -> None:
        """Count the request; a decision-log line per deny, shadow deny and degraded verdict; the access log."""
        route = facts.route
        metrics = route.metrics if route is not None else _NO_ROUTE
        metrics.count(status)
        took = perf_counter() - facts.started
        metrics.duration.observe(took)
        decision = facts.decision
        if decision is not None and route is not None:
            principal = decision.identity.principal if decision.identity is not None else None
            for v in decision.verdicts:
                if v.degraded or not v.allow or v.shadow_deny:
                    rt.decisions.record(request_id=facts.rid, route=route.name, check=v.check,
                                        decision=v.decision, basis=v.basis, reason=v.reason,
                                        status=status, client=facts.client, principal=principal)
        if self.access_log is not None:
            trace = facts.trace
            length = request.content_length
            self.access_log.put({
                "ts": round(time(), 3), "request_id": facts.rid, "route": route.name if route else None,
                "method": request.method, "path": request.raw_path.split("?", 1)[0], "status": status,
                "bytes_in": trace.bytes_in if trace is not None and trace.bytes_in else (length or 0),
                "bytes_out": response_bytes,
                "duration_ms": round(took * 1000, 3), "checks_ms": round(facts.checks * 1000, 3),
                "upstream_ms": round(trace.seconds * 1000, 3) if trace is not None and trace.seconds is not None
                else None,
                "upstream_target": trace.target if trace is not None else None,
                "upstream_status": trace.status if trace is not None else None,
                "degraded": [v.tag() for v in decision.verdicts if v.degraded] if decision is not None else [],
                "client": request.remote,
            })

    def _route(self, request: web.BaseRequest, rt: Runtime,
               facts: Facts) -> web.StreamResponse | tuple[Route, Target, Authority | None]:
        """The route for this request, or the response that refuses it (400, 404, 405, 413, 431, 501, 505)."""
        rid = facts.rid
        method = request.method
        version = request.version
        if version is not HttpVersion11 and version not in _SERVED_VERSIONS:
            # Answer in a version we speak (aiohttp writes the request's version in the status line).
            # (typed a NamedTuple, but aiohttp's C parser makes a look-alike: read untyped, so that a compiled
            # build does not check it for what it is not)
            message = getattr(request, "_message")  # noqa: B009
            request._message = message._replace(version=HttpVersion11)
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
            raw_host = target.authority if target.authority is not None else headers.get(hdrs.HOST)
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
        facts.route = route
        length = request.content_length
        if length is not None and length > rt.max_body:  # before the checks, and before any 100 Continue
            resp = error_response(413, f"the request body is larger than {rt.max_body} bytes", route=route.name,
                                  request_id=rid, request_id_header=rid_header)
            resp.force_close()
            return resp
        if route.auth is not None and len(headers.getall(route.auth.header, ())) > 1:
            return error_response(400, f"more than one {route.auth.header} header", route=route.name,
                                  request_id=rid, request_id_header=rid_header)
        if hdrs.UPGRADE in headers:
            if method == "GET" and version is HttpVersion11 and is_websocket(headers):
                facts.websocket = True
            else:
                resp = error_response(501, "protocol upgrades other than WebSocket (GET, HTTP/1.1) are not "
                                      "supported", route=route.name, request_id=rid, request_id_header=rid_header)
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
        deny = decision.deny
        for v in decision.verdicts:
            if v is not deny:
                reply.extend(v.headers)
        retry = _rate_limit_fields(decision.verdicts, reply)
        tag = None
        degraded = [v.tag() for v in decision.verdicts if v.degraded]
        if degraded:
            tag = ", ".join(degraded)
            reply.append((rt.degraded_header, tag))
        if deny is None:
            return tag, None
        extra = dict(reply)
        extra.update(deny.headers)
        if deny.quota is not None:
            extra["Retry-After"] = str(retry)
        if deny.body is not None:  # the authorizer's own answer (a login redirect, its error page)
            body, content_type = deny.body
            resp = web.Response(status=deny.status, body=body, headers=extra)
            resp.content_type = content_type.split(";", 1)[0]
            resp.headers[rt.request_id_header] = rid
            return tag, resp
        return tag, error_response(deny.status, deny.detail, route=route.name, request_id=rid,
                                   request_id_header=rt.request_id_header, code=deny.code, headers=extra)

    def _outgoing(self, request: web.BaseRequest, rt: Runtime, route: Route, target: Target,
                  authority: Authority | None, reply: list[tuple[str, str]], tag: str | None,
                  identity: Identity | None, rid: str) -> Outgoing:
        trusted = rt.is_trusted_peer(request.remote)
        out_headers = upstream_headers(request, rt.drop_headers if trusted else rt.drop_headers_untrusted,
                                       rt.own_headers, route.upstream,
                                       authority.value if authority is not None else None, route.preserve_host,
                                       self._proto, trusted, rt.request_id_header, rid)
        if tag is not None:
            out_headers[rt.degraded_header] = tag
        if identity is not None:
            out_headers[_PRINCIPAL] = identity.principal
            out_headers[_SCOPES] = ",".join(identity.scopes)
            if identity.plan is not None:
                out_headers[_PLAN] = identity.plan
        if route.drop_credentials is not None:
            out_headers.popall(route.drop_credentials, None)
        if route.upstream.authorization is not None:  # the upstream's own credentials, from its URL
            out_headers["Authorization"] = route.upstream.authorization
        path = target.path
        if route.prefix_chars:
            path = path[route.prefix_chars:] or "/"
        return Outgoing(request.method, f"{path}?{target.query}" if target.query else path, out_headers,
                        rt.max_body, [(rt.request_id_header, rid), *reply],
                        Trace() if self.access_log is not None else None)
