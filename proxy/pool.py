"""Keep-alive HTTP/1.1 connections to one upstream target: what forward.py sends a request over.

Built from aiohttp's own parts — its client protocol and C response parser (`ResponseHandler`), its request writer
(`StreamWriter`, whose C serializer refuses a header with CR or LF) and its exceptions — without the ClientSession
around them. Per request a ClientSession also parses a URL, merges default headers and cookies, builds a request
and a response object, runs its trace hooks and arms its timers, none of which a proxy needs: on the benchmark
machine it costs four times the CPU of this pool (`python -m benchmarks.client_cost`).

What is kept of a client's duties:
- connections are reused most recent first; one idle for 30 s is closed (by one timer per pool, armed while any
  connection is idle), and one the upstream closed is never handed out;
- a reused connection the upstream closed before answering (its keep-alive ended as the request went out) is
  retried once on a new connection when the request is idempotent and its body, if any, is held whole
  (RFC 9112 §9.3.1) — nothing else is ever sent twice;
- `connect_timeout` bounds the name's resolution, the TCP connect and the TLS handshake; a name is resolved at most
  once per 10 s, one resolution shared by the connections opened meanwhile; certificates are verified unless
  `tls_verify: false`;
- a streamed request body goes out while the response may already come back (an upstream may answer 413 early),
  chunked when the client gave no Content-Length;
- interim 1xx responses are skipped; a response to HEAD, and 204 and 304, has no body; a response with neither
  a length nor chunked framing runs to the connection's end.

`ResponseHandler` and `StreamWriter` are aiohttp's internals rather than its documented API (aiohttp's own client
has used them unchanged in shape for years): pyproject.toml sets the aiohttp versions they are used with, and the
tests exercise every path of them used here, so a release that changes them fails the suite, not a deployment.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import NamedTuple

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

IDLE_FOR = 30.0  # a connection idle this long is closed rather than reused
RESOLVED_FOR = 10.0  # a target name's addresses are reused this long (aiohttp's DNS cache kept them as long)
_CHUNK = 1 << 16  # read buffer
_MAX_FIELD = 65536  # the longest response header line accepted
_IDEMPOTENT = frozenset(["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"])
# A request of any other method without a body says so (`Content-Length: 0`): some servers answer 411 otherwise.
_BODILESS = frozenset(["GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"])


class Origin(NamedTuple):
    """Where a URL's requests go: the address to connect to, whether over TLS, and what `Host` says of it
    (host[:port], never the userinfo)."""

    host: str
    port: int
    tls: bool
    host_header: str

    @classmethod
    def of(cls, url: URL) -> Origin:
        host = url.raw_host or ""
        bracketed = f"[{host}]" if ":" in host else host
        return cls(host, url.port or 80, url.scheme == "https",
                   bracketed if url.explicit_port is None else f"{bracketed}:{url.explicit_port}")


class BadResponse(aiohttp.ClientError):
    """The upstream's response could not be parsed as HTTP/1.1."""


class _Connection(ResponseHandler):
    """aiohttp's response protocol, which also leaves its pool's list of open connections when it closes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: Pool) -> None:
        super().__init__(loop)
        self.pool = pool

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.pool.open.discard(self)


class Response:
    """An upstream's answer: status line, headers, and the body as aiohttp's StreamReader (`content`). Give the
    connection back with `read()` or `release()` once the body is consumed, or `close()` it."""

    __slots__ = ("_conn", "_sending", "content", "headers", "reason", "status")

    def __init__(self, conn: _Connection, status: int, reason: str, headers: CIMultiDictProxy[str],
                 content: StreamReader, sending: asyncio.Task[None] | None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self._conn = conn
        self._sending = sending  # the request body still going out, if streamed

    @property
    def content_length(self) -> int | None:
        length = self.headers.get("Content-Length")
        return int(length) if length is not None else None  # the parser accepted only digits

    async def read(self) -> bytes:
        try:
            body = await self.content.read()
        except BaseException:
            self.close()
            raise
        self.release()
        return body

    def release(self) -> None:
        """The body was read to its end: the connection is reused if both sides of the exchange are complete."""
        conn = self._conn
        sending = self._sending
        if sending is not None and not sending.done():
            sending.cancel()
            conn.close()
        elif conn.should_close or not conn.is_connected() or conn.pool.closed:
            conn.close()
        else:
            conn.pool.keep(conn)

    def close(self) -> None:
        if self._sending is not None and not self._sending.done():
            self._sending.cancel()
        self._conn.close()


class Pool:
    """Connections to one target (`host`, `port`; TLS when `tls` is a context)."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, connect_timeout: float) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.idle: deque[tuple[_Connection, float]] = deque()  # most recently used last
        self.open: set[_Connection] = set()
        self.closed = False
        self._numeric = _is_address(host)
        self._resolved: tuple[float, list[tuple[int, str]]] | None = None  # (when, [(family, address)])
        self._resolving: asyncio.Task[list[tuple[int, str]]] | None = None
        self._sweep: asyncio.TimerHandle | None = None  # closes idle connections when nothing else does

    @classmethod
    def to(cls, origin: Origin, verify: bool, connect_timeout: float) -> Pool:
        """A pool for `origin`; over TLS, certificates verified unless `verify` is false."""
        return cls(origin.host, origin.port, _tls_context(verify) if origin.tls else None, connect_timeout)

    async def request(self, method: str, path_qs: str, headers: CIMultiDict[str],
                      data: AsyncIterator[bytes] | bytes | None) -> Response:
        """Send a request and wait for its response's status and headers; raises aiohttp's client exceptions
        (and OSError for a refused connection) as a ClientSession would."""
        conn = self._take()
        if conn is None:
            return await self._exchange(await self._connect(), method, path_qs, headers, data)
        try:
            return await self._exchange(conn, method, path_qs, headers, data)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError):
            if method not in _IDEMPOTENT or (data is not None and type(data) is not bytes):
                raise
        return await self._exchange(await self._connect(), method, path_qs, headers, data)

    def keep(self, conn: _Connection) -> None:
        """A connection whose exchange is complete, for the next request."""
        self.idle.append((conn, time.monotonic()))
        if self._sweep is None:  # one timer per pool, armed only when none is
            self._sweep = conn._loop.call_later(IDLE_FOR, self._close_idle)

    def _close_idle(self) -> None:
        """Close what has been idle IDLE_FOR (so a pool with no traffic does not keep them for ever), and come back
        when the oldest that is left will be."""
        self._sweep = None
        self._drop_stale()
        if self.idle:
            self._sweep = asyncio.get_running_loop().call_later(
                max(self.idle[0][1] + IDLE_FOR - time.monotonic(), 0.01), self._close_idle)

    def _drop_stale(self) -> None:
        idle = self.idle
        stale = time.monotonic() - IDLE_FOR
        while idle and idle[0][1] <= stale:
            idle.popleft()[0].close()

    def _take(self) -> _Connection | None:
        idle = self.idle
        if not idle:
            return None
        self._drop_stale()
        while idle:
            conn = idle.pop()[0]
            if conn.is_connected():
                return conn
        return None

    async def _connect(self) -> _Connection:
        if self.closed:
            raise aiohttp.ClientConnectionError("the upstream's connections were closed (reload or shutdown)")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self._numeric:
                    _, conn = await loop.create_connection(lambda: _Connection(loop, self), self.host, self.port,
                                                           ssl=self.tls)
                else:
                    conn = await self._connect_by_name(loop)
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(f"could not connect to {self.host}:{self.port} in time") from None
        if conn.is_connected():  # (not if it was closed as soon as it opened)
            self.open.add(conn)
        return conn

    async def _connect_by_name(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        """Each address the name resolved to, in order, until one connects (as create_connection would)."""
        failure: OSError | None = None
        for family, address in await self._addresses(loop):
            try:
                _, conn = await loop.create_connection(lambda: _Connection(loop, self), address, self.port,
                                                       ssl=self.tls, family=family,
                                                       server_hostname=self.host if self.tls is not None else None)
                return conn
            except OSError as exc:
                failure = exc
        assert failure is not None  # (getaddrinfo returns at least one address or raises)
        raise failure

    async def _addresses(self, loop: asyncio.AbstractEventLoop) -> list[tuple[int, str]]:
        """The target name's addresses: resolved at most once per RESOLVED_FOR, one resolution shared by every
        connection opened meanwhile (a burst of new connections is not a burst of DNS queries)."""
        known = self._resolved
        if known is not None and time.monotonic() - known[0] < RESOLVED_FOR:
            return known[1]
        if self._resolving is None:
            self._resolving = loop.create_task(self._resolve(loop))
        return await asyncio.shield(self._resolving)  # (one connect timing out does not cancel it for the others)

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[tuple[int, str]]:
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            addresses: list[tuple[int, str]] = [(int(family), str(sockaddr[0])) for family, _, _, _, sockaddr in infos]
            self._resolved = (time.monotonic(), addresses)
            return addresses
        finally:
            self._resolving = None

    async def _exchange(self, conn: _Connection, method: str, path_qs: str, headers: CIMultiDict[str],
                        data: AsyncIterator[bytes] | bytes | None) -> Response:
        conn.set_response_params(skip_payload=method == "HEAD", read_until_eof=True, auto_decompress=False,
                                 max_field_size=_MAX_FIELD, read_bufsize=_CHUNK)
        writer = StreamWriter(conn, conn._loop)
        sending = None
        try:
            if data is None:
                if method not in _BODILESS and "Content-Length" not in headers:
                    headers["Content-Length"] = "0"
                await writer.write_headers(f"{method} {path_qs} HTTP/1.1", headers)
                writer.set_eof()
            elif isinstance(data, bytes):
                headers["Content-Length"] = str(len(data))
                await writer.write_headers(f"{method} {path_qs} HTTP/1.1", headers)
                await writer.write_eof(data)
            else:
                if "Content-Length" not in headers:
                    headers["Transfer-Encoding"] = "chunked"
                    writer.enable_chunking()
                await writer.write_headers(f"{method} {path_qs} HTTP/1.1", headers)
                writer.send_headers()
                sending = asyncio.get_running_loop().create_task(_send_body(conn, writer, data))
            while True:
                message, content = await conn.read()
                if not 100 <= message.code <= 199 or message.code == 101:
                    break  # an interim response (100 Continue, 103 Early Hints) is not the answer
        except HttpProcessingError as exc:
            conn.close()
            if sending is not None:
                sending.cancel()
            raise BadResponse(f"the upstream's response is not valid HTTP: {exc.message}") from None
        except BaseException:
            conn.close()
            if sending is not None:
                sending.cancel()
            raise
        return Response(conn, message.code, message.reason, message.headers, content, sending)

    async def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self.idle.clear()
        for conn in list(self.open):
            conn.close()


async def _send_body(conn: _Connection, writer: StreamWriter, data: AsyncIterator[bytes]) -> None:
    """Stream a request body; a failure is handed to whoever waits for the response, as aiohttp does."""
    try:
        async for chunk in data:
            await writer.write(chunk)
        await writer.write_eof()
    except OSError as exc:
        if exc.errno is None and isinstance(exc, TimeoutError):
            conn.set_exception(exc)  # the client's body went idle
        else:
            conn.set_exception(aiohttp.ClientOSError(exc.errno, "could not write the request body"), exc)
    except asyncio.CancelledError:
        conn.close()
        raise
    except Exception as exc:  # the body's own failure (too large, the client went away)
        conn.set_exception(aiohttp.ClientConnectionError("the request body could not be sent"), exc)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _tls_context(verify: bool) -> ssl.SSLContext:
    """The system's trust store (SSL_CERT_FILE and SSL_CERT_DIR apply), or — `tls_verify: false` — none."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
