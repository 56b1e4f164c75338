"""Streams a request to its upstream and the response back, in bounded memory both ways.

One connection pool per upstream target (pool.py; targets.py picks the target and keeps its health). Time budgets:
`connect_timeout` (502), `timeout` until the response headers (504), `idle_timeout` for any pause while a body
streams either way (the stream is cut; the status was already sent).

An idempotent request (RFC 9110) whose body is empty or small enough to be read whole first (64 KiB, with a
Content-Length) goes once more, to another target, when the first could not be connected to or closed the
connection before any byte of a response. Nothing else is ever sent twice: not a POST, not a streamed body, not a
request that timed out (the target may be working on it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from .config.schema import Upstream
from .observe.metrics import UPSTREAM_DURATION, UPSTREAM_RETRIES, FastHistogram, incrementer
from .pool import Response
from .targets import Balancer, Target
from .timeouts import expiry

log = logging.getLogger("failgate.forward")

# RFC 9110 §7.6.1 hop-by-hop fields, plus the non-standard ones proxies still see.
HOP_BY_HOP = frozenset(
    ["connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade"]
)
# Headers a client could use to lie to the upstream about itself (its address, scheme, the URL it asked for):
# passed on only from a peer that trusted_proxies vouches for. Any other X-Forwarded-* header, and every `_`
# spelling of all of these (some servers read `X_Forwarded_For` as `X-Forwarded-For`), likewise.
SPOOFABLE = frozenset(["forwarded", "x-real-ip", "x-original-url", "x-rewrite-url", "x-forwarded-proto"])
_SMALL = 1 << 16  # response bodies up to this size are buffered and sent in one write
_NO_LENGTH = HOP_BY_HOP | {"content-length"}  # a body read whole: aiohttp sets its length


class UpstreamFailed(Exception):
    """Raised before any response byte was sent: answer with `status` (and the check headers already decided)."""

    def __init__(self, status: int, detail: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = dict(headers or ())


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    """The client disconnected mid-response; `response` is what was prepared (aiohttp finishes it quietly)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.response = response


@dataclass(slots=True)
class Trace:
    """What the upstream leg did, for the access log: the target tried last, its status, time to its headers."""

    target: str | None = None
    status: int | None = None
    seconds: float | None = None
    bytes_in: int = 0  # request body bytes read from the client


class Outgoing(NamedTuple):  # (made per request: a NamedTuple costs a third of what a frozen dataclass does)
    """What the app decided to send upstream."""

    method: str
    path_qs: str  # normalized path (after strip_prefix) + "?" + raw query
    headers: CIMultiDict[str]
    max_body: int
    reply_headers: list[tuple[str, str]]  # added to the response: request id, RateLimit fields, degraded tag
    trace: Trace | None = None  # filled in when the access log is on


# RFC 9110 §9.2.2: a request that can be sent twice with the effect of once.
IDEMPOTENT = frozenset(["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
_GATEWAY_STATUSES = frozenset([502, 503, 504])


class _NoResponse(Exception):
    """The target could not be connected to, or closed the connection before any byte of a response: nothing
    was answered, so an idempotent request with a replayable body may go to another target."""

    def __init__(self, failed: UpstreamFailed) -> None:
        super().__init__(failed.detail)
        self.failed = failed


class _Body:
    """A request body streamed upstream in chunks, counting against max_body as it goes."""

    __slots__ = ("too_large",)

    def __init__(self) -> None:
        self.too_large = False

    async def stream(self, request: web.BaseRequest, max_body: int, idle: float,
                     trace: Trace | None = None) -> AsyncIterator[bytes]:
        seen = 0
        content = request.content
        while True:
            with expiry(idle):
                chunk = await content.readany()
            if not chunk:
                return
            seen += len(chunk)
            if trace is not None:
                trace.bytes_in = seen
            if seen > max_body:
                self.too_large = True
                raise BodyTooLarge
            yield chunk


class UpstreamClient:
    """One upstream: its targets (balancer and passive health, targets.py) and time budgets."""

    def __init__(self, name: str, cfg: Upstream, targets: list[Target]) -> None:
        self.name = name
        self.cfg = cfg
        self.targets = targets
        self.balancer = Balancer(name, targets, cfg.balance, cfg.eject.failures, cfg.eject.for_)
        # Userinfo in the URL becomes an `Authorization: Basic` header (validation: the same on every target).
        self.authorization = targets[0].authorization
        self._several = len(targets) > 1
        self._duration = FastHistogram.of(UPSTREAM_DURATION.labels(name))
        self._retries = incrementer(UPSTREAM_RETRIES.labels(name))

    def state(self) -> dict[str, object]:
        return {"balance": self.cfg.balance, "targets": [t.state() for t in self.targets]}

    async def forward(self, request: web.BaseRequest, out: Outgoing) -> web.StreamResponse:
        """Send `out` upstream and stream the answer to the client; raises UpstreamFailed before the status."""
        body = _Body()
        data: AsyncIterator[bytes] | bytes | None = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length > out.max_body:
                raise UpstreamFailed(413, f"the request body is larger than {out.max_body} bytes", out.reply_headers)
            if self._several and out.method in IDEMPOTENT and length is not None and length <= _SMALL:
                data = await self._read_whole(request, body, out)  # small and replayable: may go to another target
            else:
                data = body.stream(request, out.max_body, self.cfg.idle_timeout, out.trace)
        own_host = "Host" not in out.headers  # not preserve_host: each target is told its own name
        target = self.balancer.pick()
        assert target is not None  # never more than half of the targets are out
        try:
            return await self._send(request, out, target, own_host, data, body)
        except _NoResponse as first:
            if (data is not None and type(data) is not bytes) or out.method not in IDEMPOTENT:
                raise first.failed from None
            other = self.balancer.pick(exclude=target)
            if other is None:
                raise first.failed from None
            self._retries(1.0)
            log.debug("upstream %s: %s %s sent again to %s after %s", self.name, out.method, out.path_qs,
                      other.label, first.failed.detail)
            try:
                return await self._send(request, out, other, own_host, data, body)
            except _NoResponse as second:
                raise second.failed from None

    async def _read_whole(self, request: web.BaseRequest, body: _Body, out: Outgoing) -> bytes:
        chunks = []
        try:
            async for chunk in body.stream(request, out.max_body, self.cfg.idle_timeout, out.trace):
                chunks.append(chunk)
        except BodyTooLarge:
            raise UpstreamFailed(413, "the request body is larger than limits.max_body", out.reply_headers) from None
        except (TimeoutError, ConnectionError, aiohttp.ClientPayloadError, OSError):
            raise UpstreamFailed(400, "the request body did not arrive", out.reply_headers) from None
        return b"".join(chunks)

    async def _send(self, request: web.BaseRequest, out: Outgoing, target: Target, own_host: bool,
                    data: AsyncIterator[bytes] | bytes | None, body: _Body) -> web.StreamResponse:
        if own_host:
            out.headers["Host"] = target.host_header
        trace = out.trace
        if trace is not None:
            trace.target, trace.status, trace.seconds = target.label, None, None
        balancer = self.balancer
        started = time.perf_counter()
        content: bytes | None = None
        upstream: Response | None = None
        target.in_flight += 1
        try:
            # One deadline per request: `timeout` until the headers, then — for a small body read whole —
            # `idle_timeout`.
            try:
                with expiry(self.cfg.timeout) as budget:
                    upstream = await target.pool.request(out.method, target.base_path + out.path_qs, out.headers,
                                                         data)
                    took = time.perf_counter() - started
                    self._duration.observe(took)
                    if trace is not None:
                        trace.status, trace.seconds = upstream.status, took
                    if upstream.status in _GATEWAY_STATUSES:
                        balancer.failed(target, f"it answered {upstream.status}")
                    elif target.failures:
                        balancer.answered(target)
                    length = upstream.content_length
                    if length is not None and length <= _SMALL and out.method != "HEAD":
                        # Most API responses: read whole and sent with the headers in one write (each extra write
                        # is a system call).
                        budget.reschedule(self.cfg.idle_timeout)
                        content = await upstream.read()
            # aiohttp's timeout errors subclass TimeoutError, so they come first.
            except aiohttp.ConnectionTimeoutError:
                balancer.failed(target, "a connect timeout")
                raise _NoResponse(self._failed(body, 502, "could not connect to the upstream in time", out)) from None
            except TimeoutError:
                if upstream is not None:
                    upstream.close()
                    raise UpstreamFailed(502, "the upstream response was cut short", out.reply_headers) from None
                balancer.failed(target, "a timeout")
                raise self._failed(body, 504, "the upstream did not answer in time", out) from None
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
                if upstream is not None:
                    log.info("body from upstream %s cut: %r", self.name, exc)
                    raise UpstreamFailed(502, "the upstream response was cut short", out.reply_headers) from None
                balancer.failed(target, "a closed connection")
                raise _NoResponse(self._failed(body, 502, "the upstream could not be reached", out)) from None
            except (aiohttp.ClientError, OSError, BodyTooLarge) as exc:
                log.debug("upstream %s failed: %r", self.name, exc)
                failed = self._failed(body, 502, "the upstream could not be reached", out)
                if body.too_large:
                    raise failed from None
                balancer.failed(target, "a refused or reset connection")
                if isinstance(exc, (aiohttp.ClientConnectionError, OSError)):
                    raise _NoResponse(failed) from None
                raise failed from None
            assert upstream is not None
            if content is not None:
                typed = hdrs.CONTENT_TYPE in upstream.headers
                resp = (web.Response if typed else _UntypedResponse)(status=upstream.status, reason=upstream.reason,
                                                                     body=content)
                copy_response_headers(upstream.headers, resp.headers, _NO_LENGTH)
                for name, value in out.reply_headers:
                    resp.headers[name] = value
                return resp
            return await self._stream(request, upstream, out)
        finally:
            target.in_flight -= 1

    def _failed(self, body: _Body, status: int, detail: str, out: Outgoing) -> UpstreamFailed:
        if body.too_large:
            return UpstreamFailed(413, "the request body is larger than limits.max_body", out.reply_headers)
        return UpstreamFailed(status, detail, out.reply_headers)

    async def _stream(
        self, request: web.BaseRequest, upstream: Response, out: Outgoing
    ) -> web.StreamResponse:
        typed = hdrs.CONTENT_TYPE in upstream.headers
        resp = (web.StreamResponse if typed else _UntypedStream)(status=upstream.status, reason=upstream.reason)
        headers = resp.headers
        copy_response_headers(upstream.headers, headers)
        for name, value in out.reply_headers:
            headers[name] = value
        idle = self.cfg.idle_timeout
        try:
            await resp.prepare(request)
            content = upstream.content
            while True:
                # idle_timeout bounds the pause either way: an upstream that stops sending, or a client that stops
                # reading (its write would otherwise wait forever and hold the handler and the upstream).
                with expiry(idle):
                    chunk = await content.readany()
                    if chunk:
                        await resp.write(chunk)
                if not chunk:
                    break
            await resp.write_eof()
        except ConnectionError:  # includes aiohttp.ClientConnectionResetError
            # The client went away: drop the upstream connection rather than reuse it mid-body.
            upstream.close()
            raise ClientGone(resp) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # The upstream failed or went idle mid-body, or the client stopped reading. The status is gone
            # already: cut both sides, so the client sees a truncated response, not a complete one.
            log.info("stream from upstream %s cut: %r", self.name, exc)
            upstream.close()
            if request.transport is not None:
                request.transport.abort()
        except BaseException:  # cancelled (shutdown), or anything unforeseen: mid-body, never left open or reused
            upstream.close()
            raise
        else:
            upstream.release()
        return resp


class _UntypedResponse(web.Response):
    """A relayed response whose upstream gave no Content-Type: aiohttp gives every body without one
    `application/octet-stream` while it prepares the headers; a proxy adds no type the upstream did not (a client
    may sniff it)."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.CONTENT_TYPE, None)


class _UntypedStream(web.StreamResponse):
    """The same for a streamed response."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.CONTENT_TYPE, None)


def upstream_headers(request: web.BaseRequest, strip: frozenset[str], own: frozenset[str], upstream: UpstreamClient,
                     authority: str | None, preserve_host: bool, proto: str, trusted: bool, request_id_header: str,
                     request_id: str) -> CIMultiDict[str]:
    """The request headers to send upstream: hop-by-hop and `Connection`-named headers, any client copy of
    Failgate's own headers (and their `_` spellings), and — unless the peer is trusted — the headers a client
    could lie with removed; X-Forwarded-*, Host and the request id set. `authority` is the request's one host
    (None when an HTTP/1.0 request had none): what Host says under preserve_host, and X-Forwarded-Host."""
    src = request.headers
    tokens = connection_tokens(src)
    drop = strip | tokens if tokens else strip
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in src.items():
        low = name.lower()
        if low in drop:
            continue
        if "_" in low or low.startswith("x-forwarded-"):
            dashed = low.replace("_", "-")
            if dashed in own or (not trusted and (dashed in SPOOFABLE or dashed.startswith("x-forwarded-"))):
                continue
        out.add(name, value)
    peer = request.remote
    xff = src.getall("X-Forwarded-For", [])
    out["X-Forwarded-For"] = ", ".join([*xff, peer]) if xff and peer else (peer or "")
    if not trusted or "X-Forwarded-Proto" not in out:
        out["X-Forwarded-Proto"] = proto
    if authority is not None:
        out["X-Forwarded-Host"] = authority
    out[request_id_header] = request_id
    if preserve_host and authority is not None:
        out["Host"] = authority  # otherwise forward() names the target it picked
    return out


def copy_response_headers(src: CIMultiDictProxy[str], dst: CIMultiDict[str], drop: frozenset[str] = HOP_BY_HOP) -> None:
    """Every header of `src` but the hop-by-hop ones, those `Connection` names, and `drop` (which must include
    HOP_BY_HOP)."""
    tokens = connection_tokens(src)
    if tokens:
        drop = drop | tokens
    for name, value in src.items():
        if name.lower() not in drop:
            dst.add(name, value)


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    values = headers.getall(hdrs.CONNECTION, ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())
