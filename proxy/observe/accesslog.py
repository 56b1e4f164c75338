"""The optional JSON access log (`access_log: true`): one line per request. Off by default: it roughly halves
aiohttp's throughput (BASELINES.md)."""

from __future__ import annotations

import logging
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from .decisionlog import LogWriter


def access_logger() -> logging.Logger:
    return logging.getLogger("failgate.access")  # aiohttp wants one; lines go to WRITER instead


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON line per request, through the same off-loop writer as the decision log."""

    writer: LogWriter | None = None

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def log(self, request: BaseRequest, response: StreamResponse, time_taken: float) -> None:
        from ..app import ROUTE

        if self.writer is None:
            return
        route = request.get(ROUTE)
        self.writer.put({
            "ts": round(time.time(), 3),
            "request_id": response.headers.get("X-Request-Id"),
            "route": route.name if route is not None else None,
            "method": request.method,
            "path": request.raw_path.split("?", 1)[0],
            "status": response.status,
            "duration_ms": round(time_taken * 1000, 3),
            "client": request.remote,
        })
