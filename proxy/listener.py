"""The proxy's HTTP listener: aiohttp's low-level server plus the protections it lacks.

- Bounded input before any work: aiohttp's parser limits come from `limits.max_target` (the request target;
  longer is 414) and `limits.max_headers` / `limits.max_header_size` (431); the handler checks the total size
  of the headers, which the parser does not.
- Malformed requests get Failgate's own JSON answer with the right status, are counted, and are logged as one
  summary line per second at most — never a traceback per request (a 40-byte request must not make 550 bytes of
  log, synchronously).
- `limits.header_timeout`: a connection that starts a request (or opens and sends nothing) must finish the
  request's headers within this time or it is closed — slow-header clients cannot hold connections open. That
  holds for every request on a connection, also for a request pipelined behind one in flight: bytes that arrive
  after the request in flight was fully read start the next request's clock when its response is done.
- `limits.max_connections`: connections beyond it are closed as soon as they are accepted.

One timer per connection at most, re-armed lazily, so a busy keep-alive connection costs a clock read per
request and no timer churn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("failgate.listener")

# (status, detail) -> the response for a request that could not be parsed
Refuse = Callable[[int, str], web.StreamResponse]


class _Connection(RequestHandler):
    __slots__ = ("_fg_busy_data", "_fg_deadline", "_fg_done", "_fg_handle", "_fg_in_request", "_fg_rejected",
                 "_fg_request", "_fg_tail")

    def __init__(self, manager: ProxyServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._fg_deadline: float | None = None
        self._fg_handle: asyncio.TimerHandle | None = None
        self._fg_in_request = False
        self._fg_rejected = False
        self._fg_request: web.BaseRequest | None = None
        self._fg_busy_data = False  # bytes arrived after the request in flight was fully read
        self._fg_tail = False  # the last chunk read between requests went on past the end of a request head
        self._fg_done: asyncio.Future[None] | None = None  # at shutdown: the response in flight is done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        manager = self._fg_manager
        if manager.active >= manager.max_connections:
            self._fg_rejected = True
            transport.close()
            return
        manager.active += 1
        super().connection_made(transport)
        self._fg_start_header_clock()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._fg_rejected:
            return
        self._fg_manager.active -= 1
        if self._fg_handle is not None:
            self._fg_handle.cancel()
            self._fg_handle = None
        self._fg_request = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._fg_in_request:
            request = self._fg_request
            # Data while a request is served is its body — unless that body is complete: then it is the start of
            # a pipelined request, whose headers are on the clock from when this response is done.
            if request is not None and request.content.is_eof() and not self._upgraded:  # (a tunnel's messages)
                self._fg_busy_data = True
        else:
            if self._fg_deadline is None:
                self._fg_start_header_clock()
            end = data.find(b"\r\n\r\n")
            self._fg_tail = end != -1 and end + 4 < len(data)
        super().data_received(data)

    @property
    def _fg_manager(self) -> ProxyServer:
        manager = self._manager
        assert isinstance(manager, ProxyServer)
        return manager

    def _fg_start_header_clock(self) -> None:
        self._fg_deadline = self._loop.time() + self._fg_manager.header_timeout
        if self._fg_handle is None:
            self._fg_handle = self._loop.call_at(self._fg_deadline, self._fg_check)

    def _fg_check(self) -> None:
        self._fg_handle = None
        deadline = self._fg_deadline
        if deadline is None:
            return
        if self._loop.time() >= deadline:
            if self.transport is not None:
                self.transport.close()
            return
        self._fg_handle = self._loop.call_at(deadline, self._fg_check)

    # Called by ProxyServer when a request's headers are complete; cleared once its response is finished.
    def fg_request_started(self, request: web.BaseRequest) -> None:
        self._fg_deadline = None
        self._fg_in_request = True
        self._fg_request = request
        if self._fg_tail and not request.body_exists:
            self._fg_busy_data = True  # what followed this head in its chunk was the start of the next request

    async def finish_response(self, request: Any, resp: Any, start_time: Any) -> Any:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._fg_in_request = False
            self._fg_request = None
            if self._fg_done is not None and not self._fg_done.done():
                self._fg_done.set_result(None)
            if self._fg_busy_data and self._manager is not None:
                self._fg_busy_data = False
                self._fg_start_header_clock()

    # At shutdown aiohttp first marks every connection closing, then gives handlers `shutdown_grace` — but a
    # connection marked closing drops every byte that arrives after: the rest of a request body being uploaded,
    # the messages of a WebSocket tunnel. So a connection busy with a request is left alone until its response
    # is done (a draining proxy's responses say Connection: close) or the grace is over; then aiohttp's own
    # shutdown runs with what is left of the grace.
    def close(self) -> None:
        if self._fg_in_request:
            return
        super().close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        if self._fg_in_request and timeout:
            deadline = self._loop.time() + timeout
            self._fg_done = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._fg_done
            timeout = max(0.0, deadline - self._loop.time())
        await super().shutdown(timeout)

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, BadHttpMessage):  # not the client's doing: aiohttp's own report
            return super().handle_error(request, status, exc, message)
        manager = self._fg_manager
        detail = exc.message
        if isinstance(exc, LineTooLong):
            if exc.args[1] == manager.max_target:
                status, detail = 414, f"the request target is longer than {manager.max_target} bytes"
            else:
                status, detail = 431, f"a header field is longer than {manager.max_header_size} bytes"
        elif detail == "Too many headers received":
            status, detail = 431, f"more than {manager.max_headers} header fields"
        resp = manager.refuse(status, detail)
        resp.force_close()
        return resp


class ProxyServer(web.Server):
    def __init__(self, handler: Any, *, header_timeout: float, max_connections: int, max_target: int,
                 max_headers: int, max_header_size: int, refuse: Refuse, **kwargs: Any) -> None:
        # aiohttp's parser limits: the request target (max_line_size), one header field (max_field_size, never
        # more than all of them together) and their count. A limit equal to max_target would make a long header
        # field indistinguishable from a long target in the parser's error: one byte more keeps them apart.
        field = max_header_size if max_header_size != max_target else max_header_size + 1
        super().__init__(handler, max_line_size=max_target, max_field_size=field, max_headers=max_headers,
                         **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.max_target = max_target
        self.max_headers = max_headers
        self.max_header_size = max_header_size
        self.refuse = refuse
        self.active = 0

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)

    def _make_request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        request = super()._make_request(message, payload, protocol, writer, task)
        if isinstance(protocol, _Connection):
            protocol.fg_request_started(request)
        return request


class MalformedLog:
    """One summary line per second at most for requests that could not be parsed or were refused before routing:
    counts per status and the first detail of each."""

    def __init__(self) -> None:
        self._counts: dict[int, list[Any]] = {}
        self._handle: asyncio.TimerHandle | None = None

    def record(self, status: int, detail: str) -> None:
        entry = self._counts.get(status)
        if entry is None:
            self._counts[status] = [1, detail]
        else:
            entry[0] += 1
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(1.0, self.flush)

    def flush(self) -> None:
        self._handle = None
        if self._counts:
            counts = sorted(self._counts.items())
            summary = "; ".join(f"{status} x{n} (e.g. {detail})" for status, (n, detail) in counts)
            self._counts = {}
            log.warning("malformed requests refused in the last second: %s", summary)
