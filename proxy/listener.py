"""The proxy's HTTP listener: aiohttp's low-level server plus the two protections it lacks.

- `limits.header_timeout`: a connection that starts a request (or opens and sends nothing) must finish the
  request's headers within this time or it is closed — slow-header clients cannot hold connections open.
- `limits.max_connections`: connections beyond it are closed as soon as they are accepted.

One timer per connection at most, re-armed lazily, so a busy keep-alive connection costs a clock read per
request and no timer churn.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler


class _Connection(RequestHandler):
    __slots__ = ("_fg_deadline", "_fg_handle", "_fg_in_request", "_fg_rejected")

    def __init__(self, manager: ProxyServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._fg_deadline: float | None = None
        self._fg_handle: asyncio.TimerHandle | None = None
        self._fg_in_request = False
        self._fg_rejected = False

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
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._fg_deadline is None and not self._fg_in_request:
            self._fg_start_header_clock()
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
    def fg_request_started(self) -> None:
        self._fg_deadline = None
        self._fg_in_request = True

    async def finish_response(self, request: Any, resp: Any, start_time: Any) -> Any:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._fg_in_request = False


class ProxyServer(web.Server):
    def __init__(self, handler: Any, *, header_timeout: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.active = 0

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)

    def _make_request(self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        if isinstance(protocol, _Connection):
            protocol.fg_request_started()
        return super()._make_request(message, payload, protocol, writer, task)
