"""The optional JSON access log (`access_log: true`): one line per request. Off by default: it roughly halves
aiohttp's throughput (BASELINES.md)."""

from __future__ import annotations

import logging
import time

import msgspec
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

_encode = msgspec.json.Encoder().encode


def access_logger() -> logging.Logger:
    logger = logging.getLogger("failgate.access")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.INFO)
    return logger


class JsonAccessLogger(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time_taken: float) -> None:
        from ..app import ROUTE

        route = request.get(ROUTE)
        self.logger.info(_encode({
            "ts": round(time.time(), 3),
            "request_id": response.headers.get("X-Request-Id"),
            "route": route.name if route is not None else None,
            "method": request.method,
            "path": request.raw_path.split("?", 1)[0],
            "status": response.status,
            "duration_ms": round(time_taken * 1000, 3),
            "client": request.remote,
        }).decode())
