"""WebSocket tunnels: a checked handshake, then messages both ways until either side closes.

The handshake is a request like any other (routed, checked, tagged — app.py). Then, here:
1. the upstream is connected first, so its chosen subprotocol is what the client gets and its refusal (its status)
   is what the client sees — the client's 101 is sent only once the upstream's arrived;
2. messages are relayed as they are (text, binary, pings and pongs, close codes), each direction one at a time:
   a message is read only when the one before it was written, so a side that does not read stops the other side's
   reading too (TCP back-pressure all the way) and memory stays bounded whatever the speeds;
3. the tunnel ends when a side closes (its code is passed on), when a message exceeds `websocket_max_message`
   (1009), when nothing moved either way for `websocket_idle_timeout` or the tunnel reached
   `websocket_max_duration` (1001 both ways), when the upstream connection is lost (1014 to the client), or
   `shutdown_grace` after a SIGTERM (1001).

Tunnels use one process-wide client session, not the upstream targets' pools: a reload retires a config (and
closes the pools of targets it dropped) once its HTTP requests are done, while tunnels opened under it go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketError, WSCloseCode
from multidict import CIMultiDict

from .observe.metrics import WEBSOCKET_CONNECTIONS, WEBSOCKET_MESSAGES, incrementer

if TYPE_CHECKING:
    from .forward import Outgoing, UpstreamClient

log = logging.getLogger("failgate.websocket")
# aiohttp warns, once per handshake, when a client offers subprotocols its server side does not know: here the
# upstream chooses (and a client may offer ones it does not take), so that is no news — and a line per handshake.
logging.getLogger("aiohttp.websocket").setLevel(logging.ERROR)

# Headers of the client's handshake that belong to its own connection: the upstream handshake makes its own.
_HANDSHAKE = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol",
              "Sec-WebSocket-Accept")
_CLOSE_TIMEOUT = 5.0  # how long a closing handshake may wait for the other side's close frame
_BAD_GATEWAY = 1014  # (IANA: a gateway got an invalid response from, or lost, the server behind it)


def is_websocket(headers: Any) -> bool:
    """An `Upgrade: websocket` request (with `Connection: upgrade`)."""
    upgrade = headers.get("Upgrade", "")
    if upgrade.strip().lower() != "websocket":
        return False
    return any(t.strip().lower() == "upgrade" for v in headers.getall("Connection", ()) for t in v.split(","))


def take_query_param(query: str, name: str) -> tuple[list[str], str]:
    """The values of parameter `name` in a raw query string, and the query without it."""
    from urllib.parse import unquote

    values, kept = [], []
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        if unquote(key) == name:
            values.append(unquote(value))
        else:
            kept.append(item)
    return values, "&".join(kept)


class Tunnels:
    """The process's open tunnels and the client session they use; closes them at shutdown."""

    def __init__(self) -> None:
        self.open: set[asyncio.Future[None]] = set()  # each tunnel's "close now" signal
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, trust_env=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),
            )
        return self._session

    def close_all(self) -> None:
        """Close every tunnel with 1001 (shutdown)."""
        for signal in list(self.open):
            if not signal.done():
                signal.set_result(None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def tunnel(request: web.BaseRequest, upstream: UpstreamClient, out: Outgoing, route: str, tunnels: Tunnels,
                 max_duration: float | None, established: Any) -> web.StreamResponse:
    """Connect the upstream, answer the client's handshake with 101, relay until one side ends it. `established()`
    is called once the 101 is sent (the request is then no longer in flight for its config's drain)."""
    from .forward import UpstreamFailed

    cfg = upstream.cfg
    if not web.WebSocketResponse().can_prepare(request).ok:
        raise UpstreamFailed(400, "not a valid WebSocket handshake (Sec-WebSocket-Key and version 13 required)",
                             out.reply_headers)
    protocols = [p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", ()) for p in v.split(",")
                 if p.strip()]
    headers = CIMultiDict(out.headers)
    for name in _HANDSHAKE:
        headers.popall(name, None)
    target = upstream.balancer.pick()
    assert target is not None
    if "Host" not in headers:
        headers["Host"] = target.host_header
    try:
        async with asyncio.timeout(cfg.timeout):
            up = await tunnels.session.ws_connect(
                target.url_for(out.path_qs), headers=headers, protocols=protocols, autoclose=False, autoping=False,
                max_msg_size=cfg.websocket_max_message, compress=0, ssl=bool(cfg.tls_verify),
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=_CLOSE_TIMEOUT),
            )
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status >= 500:
            upstream.balancer.failed(target, f"it answered {exc.status}")
        status = exc.status if 400 <= exc.status <= 599 else 502
        detail = "the upstream refused the WebSocket handshake" if status == exc.status else \
            f"the upstream answered {exc.status} instead of switching to WebSocket"
        raise UpstreamFailed(status, detail, out.reply_headers) from None
    except TimeoutError:
        upstream.balancer.failed(target, "a timeout")
        raise UpstreamFailed(504, "the upstream did not answer the WebSocket handshake in time",
                             out.reply_headers) from None
    except (aiohttp.ClientError, OSError):
        upstream.balancer.failed(target, "a refused or reset connection")
        raise UpstreamFailed(502, "the upstream could not be reached", out.reply_headers) from None
    upstream.balancer.answered(target)
    # The client's side offers only the subprotocol the upstream chose: that is what the client gets.
    client = web.WebSocketResponse(protocols=(up.protocol,) if up.protocol else (), autoclose=False, autoping=False,
                                   max_msg_size=cfg.websocket_max_message, compress=False, timeout=_CLOSE_TIMEOUT)
    for name, value in out.reply_headers:
        client.headers[name] = value
    try:
        await client.prepare(request)
    except (ConnectionError, RuntimeError):
        await up.close(code=WSCloseCode.GOING_AWAY)
        raise
    established()
    gauge = WEBSOCKET_CONNECTIONS.labels(route)
    gauge.inc()
    loop = asyncio.get_running_loop()
    signal: asyncio.Future[None] = loop.create_future()
    tunnels.open.add(signal)
    try:
        await _relay(client, up, cfg.websocket_idle_timeout, max_duration, signal, route)
    finally:
        tunnels.open.discard(signal)
        gauge.dec()
    return client


class _Activity:
    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.monotonic()


async def _pump(src: Any, dst: Any, activity: _Activity, count: Any) -> tuple[str, int, bytes]:
    """Relay src's messages to dst until src ends: ("close", code, reason), ("error", code, reason) or
    ("lost", 0, b"")."""
    while True:
        msg = await src.receive()
        kind = msg.type
        if kind is WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif kind is WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif kind is WSMsgType.PING:
            await dst.ping(msg.data)
        elif kind is WSMsgType.PONG:
            await dst.pong(msg.data)
        elif kind is WSMsgType.CLOSE:
            return "close", int(msg.data or WSCloseCode.OK), (msg.extra or "").encode()
        elif kind is WSMsgType.ERROR:
            exc = msg.data
            if isinstance(exc, WebSocketError):
                return "error", exc.code, str(exc).encode()[:120]
            return "lost", 0, b""
        else:  # CLOSING, CLOSED: the connection went away
            return "lost", 0, b""
        activity.last = time.monotonic()
        count(1.0)


async def _relay(client: web.WebSocketResponse, up: aiohttp.ClientWebSocketResponse, idle: float,
                 max_duration: float | None, signal: asyncio.Future[None], route: str) -> None:
    activity = _Activity()
    started = time.monotonic()
    to_up = asyncio.ensure_future(_pump(client, up, activity, incrementer(WEBSOCKET_MESSAGES.labels(route,
                                                                                                    "to_upstream"))))
    to_client = asyncio.ensure_future(_pump(up, client, activity, incrementer(WEBSOCKET_MESSAGES.labels(route,
                                                                                                        "to_client"))))
    pumps: set[asyncio.Future[Any]] = {to_up, to_client}
    why = b""
    try:
        while True:
            now = time.monotonic()
            wake = activity.last + idle
            if max_duration is not None:
                wake = min(wake, started + max_duration)
            waiting: set[asyncio.Future[Any]] = {*pumps, signal}
            done, _ = await asyncio.wait(waiting, timeout=max(0.0, wake - now),
                                         return_when=asyncio.FIRST_COMPLETED)
            now = time.monotonic()
            if signal.done():
                why = b"the server is shutting down"
                break
            if done:
                break
            if max_duration is not None and now >= started + max_duration:
                why = b"the tunnel reached its maximum duration"
                break
            if now >= activity.last + idle:
                why = b"the tunnel was idle too long"
                break
    except asyncio.CancelledError:
        why = b"the server is shutting down"
        await _end(pumps, client, up, None, False, why)
        raise
    first = to_up if to_up.done() else to_client if to_client.done() else None
    await _end(pumps, client, up, first, first is to_up, why)


async def _end(pumps: set[asyncio.Future[Any]], client: web.WebSocketResponse, up: aiohttp.ClientWebSocketResponse,
               first: asyncio.Future[Any] | None, from_client: bool, why: bytes) -> None:
    """Stop both directions and close both sides: pass on the close of the side that ended it, or close both
    with 1001 (`why`)."""
    outcome = None
    if first is not None and not first.cancelled() and first.exception() is None:
        outcome = first.result()
    for p in pumps:
        if not p.done():
            p.cancel()
    for p in pumps:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await p
    with contextlib.suppress(Exception):
        if outcome is None:  # a timer, the shutdown, or a failed write: both sides told 1001
            await asyncio.gather(client.close(code=WSCloseCode.GOING_AWAY, message=why),
                                 up.close(code=WSCloseCode.GOING_AWAY, message=why), return_exceptions=True)
            return
        kind, code, reason = outcome
        ended, other = (client, up) if from_client else (up, client)
        if kind == "lost":
            code, reason = (_BAD_GATEWAY if other is client else WSCloseCode.GOING_AWAY), b"the other side went away"
        await other.close(code=code, message=reason)
        await ended.close(code=code, message=reason)

