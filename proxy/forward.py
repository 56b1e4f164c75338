"""Streams a request to its upstream and the response back, in bounded memory both ways.

One pooled ClientSession per upstream. Time budgets: `connect_timeout` (502), `timeout` until the response
headers (504), `idle_timeout` for any pause while a body streams either way (the stream is cut; the status was
already sent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import BasicAuth, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config.schema import Upstream
from .observe.metrics import UPSTREAM_DURATION, FastHistogram

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
_CHUNK = 1 << 16
_SMALL = 1 << 16  # response bodies up to this size are buffered and sent in one write
_NO_LENGTH = frozenset(["content-length"])


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


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What the app decided to send upstream."""

    method: str
    path_qs: str  # normalized path (after strip_prefix) + "?" + raw query
    headers: CIMultiDict[str]
    max_body: int
    reply_headers: list[tuple[str, str]]  # added to the response: request id, RateLimit fields, degraded tag


class UpstreamClient:
    """One upstream: its pooled session and time budgets."""

    def __init__(self, name: str, cfg: Upstream) -> None:
        self.name = name
        self.cfg = cfg
        url = URL(cfg.url)
        # What Host says unless preserve_host: host[:port], never the userinfo. Userinfo in the URL becomes an
        # `Authorization: Basic` header to this upstream instead (it replaces any the client sent).
        host = url.raw_host or ""
        if ":" in host:
            host = f"[{host}]"
        self.host_header = host if url.explicit_port is None else f"{host}:{url.explicit_port}"
        self.authorization = BasicAuth(url.user or "", url.password or "").encode() if url.user is not None else None
        self._origin = f"{url.scheme}://{self.host_header}"
        self._base_path = url.raw_path.rstrip("/")
        self._duration = FastHistogram(UPSTREAM_DURATION.labels(name))
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running loop.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=0, ssl=self.cfg.tls_verify, keepalive_timeout=30, ttl_dns_cache=10,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies with another
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                # No sock_read: aiohttp would re-arm a timer on every read. forward() keeps one timer per request.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout, sock_read=None),
                trust_env=False,
                max_field_size=65536,
                read_bufsize=_CHUNK,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url_for(self, path_qs: str) -> URL:
        return URL(self._origin + self._base_path + path_qs, encoded=True)

    async def forward(self, request: web.BaseRequest, out: Outgoing) -> web.StreamResponse:
        """Send `out` upstream and stream the answer to the client; raises UpstreamFailed before the status."""
        too_large = False
        data = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length > out.max_body:
                raise UpstreamFailed(413, f"the request body is larger than {out.max_body} bytes", out.reply_headers)

            async def request_body() -> AsyncIterator[bytes]:
                nonlocal too_large
                seen = 0
                content = request.content
                idle = self.cfg.idle_timeout
                while True:
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
                    if not chunk:
                        return
                    seen += len(chunk)
                    if seen > out.max_body:
                        too_large = True
                        raise BodyTooLarge
                    yield chunk

            data = request_body()

        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        body: bytes | None = None
        upstream: aiohttp.ClientResponse | None = None
        # One timer per request: `timeout` until the headers, then — for a small body read whole — `idle_timeout`.
        try:
            async with asyncio.timeout(self.cfg.timeout) as budget:
                upstream = await self.session.request(
                    out.method, self.url_for(out.path_qs), headers=out.headers, data=data,
                    allow_redirects=False, compress=None, auto_decompress=False,
                )
                self._duration.observe(time.perf_counter() - started)
                length = upstream.content_length
                if length is not None and length <= _SMALL and out.method != "HEAD":
                    # Most API responses: read whole and sent with the headers in one write (each extra write
                    # is a system call).
                    budget.reschedule(loop.time() + self.cfg.idle_timeout)
                    body = await upstream.read()
        # aiohttp's timeout errors subclass TimeoutError, so they come first.
        except aiohttp.ConnectionTimeoutError:
            raise self._failed(too_large, 502, "could not connect to the upstream in time", out) from None
        except TimeoutError:
            if upstream is not None:
                upstream.close()
                raise UpstreamFailed(502, "the upstream response was cut short", out.reply_headers) from None
            raise self._failed(too_large, 504, "the upstream did not answer in time", out) from None
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            if upstream is not None:
                log.info("body from upstream %s cut: %r", self.name, exc)
                raise UpstreamFailed(502, "the upstream response was cut short", out.reply_headers) from None
            raise self._failed(too_large, 502, "the upstream could not be reached", out) from None
        except (aiohttp.ClientError, OSError, BodyTooLarge) as exc:
            log.debug("upstream %s failed: %r", self.name, exc)
            raise self._failed(too_large, 502, "the upstream could not be reached", out) from None
        assert upstream is not None
        if body is not None:
            resp = web.Response(status=upstream.status, reason=upstream.reason, body=body)
            copy_response_headers(upstream.headers, resp.headers, _NO_LENGTH)
            for name, value in out.reply_headers:
                resp.headers[name] = value
            return resp
        return await self._stream(request, upstream, out)

    def _failed(self, too_large: bool, status: int, detail: str, out: Outgoing) -> UpstreamFailed:
        if too_large:
            return UpstreamFailed(413, "the request body is larger than limits.max_body", out.reply_headers)
        return UpstreamFailed(status, detail, out.reply_headers)

    async def _stream(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, out: Outgoing
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
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
                async with asyncio.timeout(idle):
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
        else:
            upstream.release()
        return resp


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
    out["Host"] = (authority or upstream.host_header) if preserve_host else upstream.host_header
    return out


def copy_response_headers(src: CIMultiDictProxy[str], dst: CIMultiDict[str],
                          extra_drop: frozenset[str] = frozenset()) -> None:
    tokens = connection_tokens(src)
    drop = HOP_BY_HOP | extra_drop | tokens if tokens or extra_drop else HOP_BY_HOP
    for name, value in src.items():
        if name.lower() not in drop:
            dst.add(name, value)


def connection_tokens(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())
